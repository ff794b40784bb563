"""How the client retries a broken stream: bounded exponential backoff with jitter.

An *outage* starts at the first failure after a batch arrived and ends at the
next batch that arrives; the budget (``attempts``, ``deadline``) is per outage,
so a long job survives many short server restarts but never waits forever on
one that does not come back.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from batchwire.client._errors import BatchwireError, ServerError

log = logging.getLogger(__name__)
T = TypeVar("T")

# A server that is restarting, draining or unreachable, or a reset connection.
# CANCELLED too: the client never cancels a call before it ends on its own (only
# once its consumer is gone), so a CANCELLED status comes from the other side: a
# draining grpc server cancelling a stream stuck in flow control, or a proxy
# resetting it. NOT_FOUND, INVALID_ARGUMENT, INTERNAL, UNAUTHENTICATED, ... are
# raised at once: asking again would get the same answer.
DEFAULT_RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED}
)
# Any other status is retried too when the server marks it transient (trailing
# metadata "batchwire-transient", see the .proto): RESOURCE_EXHAUSTED for its
# stream limit, which a slot freeing up, or another replica, lifts.
TRANSIENT_KEY = "batchwire-transient"


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to reconnect after a stream broke.

    ``RetryPolicy(attempts=0)`` disables reconnecting.
    """

    attempts: int = 10
    """Reconnect attempts per outage before giving up."""
    deadline: float = 120.0
    """Seconds from the first failure of an outage after which no attempt starts."""
    initial_backoff: float = 0.1
    """Seconds before the first reconnect attempt."""
    max_backoff: float = 5.0
    """Upper bound of any single wait."""
    multiplier: float = 2.0
    """Growth of the wait from one attempt to the next."""
    jitter: float = 0.2
    """Each wait is shortened by a random fraction up to this, so that many
    trainers cut off by one server restart do not reconnect in lock-step."""
    retryable: frozenset[grpc.StatusCode] = field(default=DEFAULT_RETRYABLE)
    """Status codes that start or continue an outage; others are raised at once, unless
    the server marked them transient (``batchwire-transient``: its stream limit)."""

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or self.attempts < 0:
            raise ValueError(
                f"attempts should be a non-negative integer, but got attempts={self.attempts!r}"
            )
        for name in ("deadline", "initial_backoff", "max_backoff"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} should be >= 0 seconds, but got {name}={value!r}")
        if not self.multiplier >= 1:
            raise ValueError(f"multiplier should be >= 1, but got multiplier={self.multiplier!r}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter should be in [0, 1], but got jitter={self.jitter!r}")

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before reconnect ``attempt`` (1-based)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return ceiling * (1 - self.jitter * (rng or random).random())


class StreamCutShort(ServerError):
    """A stream ended without an error status before its share did: a batch half
    sent, or batches missing at the end. Resumed at the owed batch like a broken
    stream (whatever ``RetryPolicy.retryable`` says), never taken as complete."""

    def __init__(self, details: str, *, target: str = "") -> None:
        super().__init__(grpc.StatusCode.DATA_LOSS, details, target=target)


class RetryError(BatchwireError):
    """A stream kept failing until the retry budget was spent.

    ``attempts``, ``elapsed`` (seconds since the outage began) and
    ``last_error`` (the last ``ServerError``) say what was tried.
    """

    def __init__(
        self,
        what: str,
        *,
        attempts: int,
        elapsed: float,
        last_error: ServerError,
        policy: RetryPolicy,
    ) -> None:
        self.attempts = attempts
        self.elapsed = elapsed
        self.last_error = last_error
        self.policy = policy
        super().__init__(
            f"gave up on {what} after {attempts} reconnect attempt(s) over {elapsed:.1f}s "
            f"(budget: attempts={policy.attempts}, deadline={policy.deadline}s); "
            f"last error: {last_error}"
        )


class Outage:
    """Counts the failed attempts of one outage and decides how long to wait, or to give up."""

    def __init__(self, policy: RetryPolicy, clock) -> None:
        self._policy = policy
        self._clock = clock
        self._started: float | None = None
        self.attempts = 0

    def reset(self) -> None:
        """A batch arrived: the outage, if any, is over."""
        self._started = None
        self.attempts = 0

    def next_wait(self, error: ServerError, what: str) -> float:
        """Seconds to wait before the next attempt; raises ``error`` or ``RetryError`` instead."""
        policy = self._policy
        transient = isinstance(error, StreamCutShort) or TRANSIENT_KEY in error.metadata
        if error.code not in policy.retryable and not transient:
            raise error
        now = self._clock()
        if self._started is None:
            self._started = now
        elapsed = now - self._started
        self.attempts += 1
        wait = policy.backoff(self.attempts)
        if self.attempts > policy.attempts or elapsed + wait > policy.deadline:
            raise RetryError(
                what,
                attempts=self.attempts - 1,
                elapsed=elapsed,
                last_error=error,
                policy=policy,
            ) from error
        return wait


def call_with_retry(
    call: Callable[[], T],
    *,
    policy: RetryPolicy,
    what: str,
    sleep: Callable[[float], object] = time.sleep,
) -> T:
    """``call()``, repeated under ``policy`` while it raises a retryable ``ServerError``.

    For the unary calls a pass depends on (``CountBatches``): a server restart
    that falls between epochs is one outage, as it is for a stream.
    """
    outage = Outage(policy, time.monotonic)
    while True:
        try:
            result = call()
        except ServerError as error:
            wait = outage.next_wait(error, what)
            log.log(
                logging.WARNING if outage.attempts == 1 else logging.INFO,
                "%s failed (%s); retry attempt %d in %.2fs",
                what,
                error,
                outage.attempts,
                wait,
            )
            sleep(wait)
            continue
        if outage.attempts:
            log.warning("%s succeeded after %d retry attempt(s)", what, outage.attempts)
        return result
