"""A task cancelled while it stops another one must stop too (pure: no etcd).

Found in the leader-SIGKILL chaos runs: a DELETE that never answered. The lease's
keepalive task, cancelled by the DELETE while it closed a stuck keepalive stream,
lost its cancellation there and went on refreshing the lease for good.
"""

from __future__ import annotations

import asyncio

import pytest

from sidecar.registry.streams import KeepAliveStream
from sidecar.tasks import cancel_and_wait

pytestmark = pytest.mark.asyncio


async def _slow_to_stop(started: asyncio.Event) -> None:
    """A task whose cancellation takes a while (a gRPC stream being torn down)."""
    try:
        started.set()
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        await asyncio.sleep(0.2)
        raise


async def test_cancel_and_wait_keeps_the_callers_cancellation() -> None:
    started = asyncio.Event()
    slow = asyncio.create_task(_slow_to_stop(started))
    await started.wait()
    stopper = asyncio.create_task(cancel_and_wait(slow))
    await asyncio.sleep(0.05)  # the stopper now waits for the slow task
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    await asyncio.wait({slow})
    assert slow.cancelled()


async def test_cancel_and_wait_returns_a_real_failure() -> None:
    async def fails() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise ValueError("broke while stopping") from None

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    failure = await cancel_and_wait(task)
    assert isinstance(failure, ValueError)


async def test_a_keepalive_loop_cancelled_while_it_closes_a_stuck_stream_ends() -> None:
    stream = KeepAliveStream(client=None)  # type: ignore[arg-type]  # the reader below never uses it
    started = asyncio.Event()
    stream._reader = asyncio.create_task(_slow_to_stop(started))
    await started.wait()
    rounds = 0

    async def keepalive() -> None:  # the shape of LeaseKeeper._keepalive: errors are retried
        nonlocal rounds
        while True:
            rounds += 1
            try:
                await stream.close()
            except Exception:
                pass
            await asyncio.sleep(0.01)

    loop_task = asyncio.create_task(keepalive())
    await asyncio.sleep(0.05)  # inside close(), waiting for the reader
    loop_task.cancel()
    done, _ = await asyncio.wait({loop_task}, timeout=5)
    assert loop_task in done and loop_task.cancelled(), f"the loop went on ({rounds} rounds)"
