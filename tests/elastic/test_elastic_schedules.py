"""Elastic epochs under random schedules of shapes (issue 12, acceptance 1).

A job steps through one epoch while its world size and batch size change at
random step boundaries (a new world size: every rank restarts from rank 0's
checkpoint; a new batch size alone: ``set_batch_size`` on the running passes),
with the server SIGKILLed and restarted somewhere in the schedule. Whatever the
schedule, the steps taken rank by rank are the schedule-free global order:
each sample of the epoch exactly once (with drop_last: all but a tail shorter
than the last step).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _serverproc import ServerProcess, free_port
from elastic_support import TESTS_CONFIG, Segment, restart_in_background, run_schedule
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchwire.server.samplers import global_order

LENGTH = 97
TESTS_DIR = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module, on a fixed port so that a restart comes back on the same target."""
    config = tmp_path_factory.mktemp("elastic") / "elastic.toml"
    config.write_text(TESTS_CONFIG.format(tests=TESTS_DIR, length=LENGTH))
    server = ServerProcess(config, port=free_port(), workers=2)
    server.start()
    try:
        yield server
    finally:
        server.stop()


segments = st.lists(
    st.builds(
        Segment,
        world_size=st.integers(1, 4),
        batch_size=st.integers(1, 9),
        steps=st.integers(1, 4),
    ),
    min_size=1,
    max_size=4,
)
last_shape = st.tuples(st.integers(1, 4), st.integers(1, 12))
PROPERTY = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,  # the same schedules on every run: CI is reproducible
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def check_epoch(
    steps: list[list[list[int]]], last: Segment, *, seed: int, epoch: int, drop_last: bool
):
    order = global_order(LENGTH, shuffle=True, seed=seed, epoch=epoch).tolist()
    delivered = [i for step in steps for batch in step for i in batch]
    assert delivered == order[: len(delivered)], "not the schedule-free global order"
    dropped = LENGTH - len(delivered)
    if drop_last:  # only a last step's worth of samples may be left out
        assert 0 <= dropped < last.world_size * last.batch_size
    else:
        assert dropped == 0, f"{dropped} samples never delivered"


@PROPERTY
@given(
    segments=segments,
    last=last_shape,
    seed=st.integers(0, 3),
    epoch=st.integers(0, 2),
    drop_last=st.booleans(),
    streams=st.sampled_from([1, 2]),
)
def test_any_schedule_delivers_the_global_order_once(
    server: ServerProcess, segments, last, seed, epoch, drop_last, streams
):
    schedule = [*segments, Segment(*last, None)]
    steps, shape = run_schedule(
        server.target, schedule, seed=seed, epoch=epoch, drop_last=drop_last, streams=streams
    )
    check_epoch(steps, shape, seed=seed, epoch=epoch, drop_last=drop_last)


@settings(PROPERTY, max_examples=3, suppress_health_check=list(HealthCheck))
@given(segments=segments, last=last_shape, kill_at=st.integers(0, 8), drop_last=st.booleans())
def test_any_schedule_survives_a_server_kill(
    server: ServerProcess, segments, last, kill_at, drop_last
):
    restarts = []

    def at_step(number: int) -> None:
        if number == kill_at and not restarts:
            restarts.append(restart_in_background(server))

    schedule = [*segments, Segment(*last, None)]
    try:
        steps, shape = run_schedule(
            server.target, schedule, seed=1, epoch=0, drop_last=drop_last, at_step=at_step
        )
    finally:
        for restart in restarts:
            restart.join(timeout=90)
    check_epoch(steps, shape, seed=1, epoch=0, drop_last=drop_last)
    if kill_at < len(steps):
        assert restarts, "the schedule never killed the server"
