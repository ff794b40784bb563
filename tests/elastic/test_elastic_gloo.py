"""A 4-rank gloo job checkpointed mid-epoch resumes as 3 ranks, then as 2 (issue 12, acceptance 3).

Each job is started as torchrun starts one (env:// rendezvous, no rank
arguments: they come from the process group); rank 0 saves the checkpoint of
its ``DevicePrefetcher`` (read-ahead subtracted) and every rank of the next,
smaller job loads that one file. The 3-rank job also ramps its batch size
mid-epoch. Over the three jobs each sample of the epoch arrives exactly once,
in the global order.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from _gloo import run_gloo_job
from _serverproc import ServerProcess

from batchwire.server.samplers import global_order

LENGTH = 103  # the core config's "dict" dataset
SEED, EPOCH = 5, 1

RANK_SCRIPT = """
import json, sys
import torch.distributed as dist
from batchwire.client import DevicePrefetcher, RemoteDataset

dist.init_process_group("gloo")
target, batch_size, steps, ramp_at, ramp_to, load, save = sys.argv[1:]
ds = RemoteDataset(target, "dict", batch_size=int(batch_size), shuffle=True, seed=5,
                   sampler="elastic")
if load:
    with open(load) as f:
        ds.load_state_dict(json.load(f))
else:
    ds.set_epoch(1)
batches = DevicePrefetcher(ds, "cpu", depth=3)
seen = []
for number, batch in enumerate(batches, 1):
    seen.append(batch["index"].tolist())
    if number == int(ramp_at):
        batches.set_batch_size(int(ramp_to))  # every rank at the same step
    checkpoint = batches.state_dict()  # in the loop: the first batch not yet trained
    if number == int(steps):
        break
if save and dist.get_rank() == 0:
    with open(save, "w") as f:
        json.dump(checkpoint, f)
print(json.dumps({"rank": dist.get_rank(), "batches": seen, "len": len(ds)}))
dist.barrier()
dist.destroy_process_group()
"""


def run_job(
    target: str,
    world_size: int,
    batch_size: int,
    *,
    steps: int = 0,
    ramp: tuple[int, int] = (0, 0),
    load: Path | None = None,
    save: Path | None = None,
) -> list[list[list[int]]]:
    """Runs a gloo job of ``world_size`` processes; returns each rank's batches (indices)."""
    args = [
        str(batch_size),
        str(steps),
        str(ramp[0]),
        str(ramp[1]),
        str(load or ""),
        str(save or ""),
    ]
    results = run_gloo_job(RANK_SCRIPT, [target, *args], world_size)
    return [result["batches"] for result in results]


def global_steps(ranks: list[list[list[int]]]) -> list[int]:
    """The job's samples step by step, rank by rank (a rank may lack the last step's batch)."""
    steps = itertools.zip_longest(*ranks, fillvalue=[])
    return [i for step in steps for batch in step for i in batch]


def test_a_4_rank_job_resumes_as_3_then_2_ranks_exactly_once(
    core_server: ServerProcess, tmp_path: Path
):
    first, second = tmp_path / "after_4.json", tmp_path / "after_3.json"
    four = run_job(core_server.target, 4, 4, steps=3, save=first)  # 48 samples
    assert [len(batches) for batches in four] == [3] * 4
    # 3 ranks: one step of 5, then 6 per rank (ramped mid-epoch): 15 + 18 samples.
    three = run_job(core_server.target, 3, 5, steps=2, ramp=(1, 6), load=first, save=second)
    assert [[len(b) for b in batches] for batches in three] == [[5, 6]] * 3
    two = run_job(core_server.target, 2, 7, load=second)  # the 22 left: 14, then 4 + 4
    assert [[len(b) for b in batches] for batches in two] == [[7, 4]] * 2

    delivered = global_steps(four) + global_steps(three) + global_steps(two)
    assert sorted(delivered) == list(range(LENGTH)), "not every sample exactly once"
    assert delivered == global_order(LENGTH, shuffle=True, seed=SEED, epoch=EPOCH).tolist()
