"""The etcd streams the client keeps open: a watch as batches of events, and the shared LeaseKeepAlive stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aetcd
import aetcd.rpc

from ..errors import LeaseNotFound, RegistryUnavailable
from ..tasks import cancel_and_wait, cancelling
from .channel import MemberClient, translate

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change under a watched prefix; ``value`` is empty for a delete."""

    deleted: bool
    key: str
    value: bytes
    revision: int


class WatchStream:
    """Batches of WatchEvents from one etcd watch; events already queued come as one batch."""

    def __init__(self, watch: Any) -> None:
        self._watch = watch
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._error: BaseException | None = None
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        try:
            async for event in self._watch:
                self._queue.put_nowait(event)
            self._queue.put_nowait(RegistryUnavailable("watch stream ended"))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._queue.put_nowait(exc)

    def __aiter__(self) -> WatchStream:
        return self

    async def __anext__(self) -> list[WatchEvent]:
        if self._error is not None:
            raise self._error
        items = [await self._queue.get()]
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        batch = []
        for item in items:
            if isinstance(item, BaseException):
                # What came before the error is delivered first; the error next time.
                self._error = translate(item)
                break
            kv = item.kv
            batch.append(WatchEvent(item.kind == "DELETE", kv.key.decode(errors="replace"), kv.value,
                                    kv.mod_revision))
        if not batch and self._error is not None:
            raise self._error
        return batch

    async def close(self) -> None:
        self._task.cancel()
        try:
            await asyncio.wait_for(self._watch.cancel(), 1.0)
        except BaseException:  # the stream may already be gone
            if cancelling():
                raise  # our caller is being stopped: not the stream's failure to swallow


async def reset_watcher(client: MemberClient) -> None:
    watcher = getattr(client, "_watcher", None)
    if watcher is None:
        return
    try:
        await asyncio.wait_for(asyncio.shield(watcher.shutdown()), 2.0)
    except BaseException:  # best effort: the stream may be broken already
        if cancelling():
            raise
        log.debug("ending the etcd watch stream failed", exc_info=True)


class KeepAliveStream:
    """One LeaseKeepAlive bidi stream shared by every lease of this process (as clientv3 does).

    Requests go through a queue that the stream consumes; answers are matched to
    waiters by lease id, in order. Nothing awaits while holding a lock, so a
    cancelled refresh can never wedge the others.
    """

    def __init__(self, client: aetcd.Client) -> None:
        self._client = client
        self._requests: asyncio.Queue[Any] = asyncio.Queue()
        self._waiters: dict[int, list[asyncio.Future[int]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.closed = False

    async def refresh(self, lease_id: int) -> int:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._run())
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(lease_id, []).append(future)
        self._requests.put_nowait(aetcd.rpc.LeaseKeepAliveRequest(ID=lease_id))
        ttl = await future
        if ttl <= 0:
            raise LeaseNotFound(f"lease {lease_id:x} not found")
        return ttl

    async def _outgoing(self) -> AsyncIterator[Any]:
        while True:
            request = await self._requests.get()
            if request is None:
                return
            yield request

    async def _run(self) -> None:
        try:
            await self._client.connect()
            call = self._client.leasestub.LeaseKeepAlive(self._outgoing(), metadata=self._client.metadata)
            async for response in call:
                waiters = self._waiters.get(response.ID)
                if not waiters:
                    continue
                future = waiters.pop(0)
                if not waiters:
                    del self._waiters[response.ID]
                if not future.done():
                    future.set_result(int(response.TTL))
            self._fail(RegistryUnavailable("etcd keepalive stream closed"))
        except asyncio.CancelledError:
            self._fail(RegistryUnavailable("etcd keepalive stream closed"))
            raise
        except Exception as exc:
            self._fail(RegistryUnavailable(f"etcd keepalive stream: {translate(exc)}"))

    def _fail(self, error: Exception) -> None:
        self.closed = True
        self._requests.put_nowait(None)
        waiters, self._waiters = self._waiters, {}
        for futures in waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)

    async def close(self) -> None:
        self.closed = True
        if self._reader is not None:
            # Not ``await self._reader`` under ``except CancelledError``: a lease's keepalive task
            # cancelled while it closes a stuck stream here lost its cancellation and went on
            # refreshing forever (its DELETE never answered, its agent kept alive).
            await cancel_and_wait(self._reader)
