"""RetryPolicy and one outage's budget, without a server."""

from __future__ import annotations

import random

import grpc
import pytest

from batchwire.client import RetryError, RetryPolicy, ServerError
from batchwire.client._retry import Outage

UNAVAILABLE = ServerError(grpc.StatusCode.UNAVAILABLE, "connection reset", target="t:1")


def test_backoff_grows_exponentially_up_to_the_bound():
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0, jitter=0.0)
    assert [policy.backoff(n) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_jitter_shortens_each_wait_by_at_most_its_fraction():
    policy = RetryPolicy(initial_backoff=1.0, max_backoff=1.0, jitter=0.5)
    rng = random.Random(0)
    waits = [policy.backoff(3, rng) for _ in range(200)]
    assert all(0.5 <= w <= 1.0 for w in waits)
    assert max(waits) - min(waits) > 0.3  # really random, not a constant


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attempts": -1}, "attempts should be a non-negative integer, but got attempts=-1"),
        ({"deadline": -2.0}, "deadline should be >= 0 seconds, but got deadline=-2.0"),
        ({"multiplier": 0.5}, "multiplier should be >= 1"),
        ({"jitter": 2}, "jitter should be in [0, 1]"),
    ],
)
def test_bad_policies_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        RetryPolicy(**kwargs)


def test_an_outage_gives_up_after_its_attempts_and_resets_on_progress():
    now = [0.0]
    outage = Outage(RetryPolicy(attempts=2, initial_backoff=0.0, jitter=0.0), lambda: now[0])
    outage.next_wait(UNAVAILABLE, "s")
    outage.next_wait(UNAVAILABLE, "s")
    with pytest.raises(RetryError) as caught:
        outage.next_wait(UNAVAILABLE, "stream x")
    assert caught.value.attempts == 2 and caught.value.last_error is UNAVAILABLE
    assert str(caught.value).startswith(
        "gave up on stream x after 2 reconnect attempt(s) over 0.0s"
    )
    outage.reset()  # a batch arrived: a new outage has the whole budget again
    assert outage.next_wait(UNAVAILABLE, "s") == 0.0


def test_an_outage_gives_up_at_its_deadline():
    now = [100.0]
    outage = Outage(
        RetryPolicy(attempts=100, deadline=3.0, initial_backoff=1.0, multiplier=1.0, jitter=0.0),
        lambda: now[0],
    )
    assert outage.next_wait(UNAVAILABLE, "s") == 1.0
    now[0] += 1.5
    assert outage.next_wait(UNAVAILABLE, "s") == 1.0  # 1.5 s in, the wait ends at 2.5 s
    now[0] += 1.5
    with pytest.raises(RetryError, match=r"over 3.0s \(budget: attempts=100, deadline=3.0s\)"):
        outage.next_wait(UNAVAILABLE, "s")


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAUTHENTICATED,
    ],
)
def test_non_retryable_codes_are_raised_as_they_are(code):
    error = ServerError(code, "no")
    with pytest.raises(ServerError) as caught:
        Outage(RetryPolicy(), lambda: 0.0).next_wait(error, "s")
    assert caught.value is error
