"""One share of an epoch's batches, streamed exactly once across reconnects.

A share is the batch positions ``start, start + stride, ...`` of one epoch.
The stream tracks the next position it owes; when the connection breaks, the
server restarts or drains, it waits (see ``_retry``) and asks again from that
position, so no batch is lost or repeated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from batchwire.client._errors import BatchwireError, ServerError
from batchwire.client._parallel import Stop
from batchwire.client._retry import Outage, RetryPolicy, StreamCutShort

log = logging.getLogger(__name__)

OpenStream = Callable[[int], Iterator[tuple[int, Any]]]
"""Opens a stream of the share from a start position; yields ``(batch_index, batch)``."""


def resuming_batches(
    open_stream: OpenStream,
    *,
    start: int,
    stride: int,
    policy: RetryPolicy,
    what: str,
    stop: Stop | None = None,
    end: Callable[[], int] | None = None,
) -> Iterator[tuple[int, Any]]:
    """Yields ``(batch_index, batch)`` of the share ``start, start + stride, ...``.

    Args:
        open_stream: opens the share's stream from a given start position.
        start, stride: the share.
        policy: when to reconnect and when to give up.
        what: names the share in logs and errors ("dataset 'x' epoch 3 ...").
        stop: set by the consumer to end the share: it cancels the open stream and
            cuts a backoff wait short.
        end: the epoch's number of batches, asked when a stream ends without an
            error: one that ends before the share does is resumed, not trusted.

    Raises:
        ServerError: a status the policy does not retry.
        RetryError: the retry budget of one outage was spent.
        BatchwireError: the server sent a batch other than the one owed.
    """
    stop = stop or Stop()
    owed = start
    outage = Outage(policy, time.monotonic)
    while True:
        try:
            for index, batch in open_stream(owed):
                if index != owed:
                    raise BatchwireError(
                        f"{what}: expected batch {owed} but the server sent batch {index}"
                    )
                owed += stride
                if outage.attempts:
                    log.warning(
                        "%s: resumed at batch %d after %d reconnect attempt(s)",
                        what,
                        index,
                        outage.attempts,
                    )
                    outage.reset()
                yield index, batch
            total = end() if end is not None else owed
            if owed >= total:
                return
            raise StreamCutShort(
                f"the stream ended without an error before batch {owed}, "
                f"but the epoch has {total} batches"
            )
        except ServerError as error:
            if stop.is_set():
                return  # the consumer left and cancelled the call: not an outage
            wait = outage.next_wait(error, f"{what} at batch {owed}")
            # The first failure of an outage is a warning; the attempts after it are detail.
            log.log(
                logging.WARNING if outage.attempts == 1 else logging.INFO,
                "%s: stream broke at batch %d (%s); reconnect attempt %d in %.2fs",
                what,
                owed,
                error,
                outage.attempts,
                wait,
            )
            if stop.wait(wait):
                return
