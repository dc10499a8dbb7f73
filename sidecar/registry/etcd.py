"""The one module that talks to etcd (through aetcd, with channel.py and streams.py); everything else uses EtcdClient.

Facts this wrapper handles (aetcd 1.0 against etcd 3.4): every call carries a
timeout (a frozen etcd otherwise blocks forever); gRPC keepalive pings make a
watch on a partitioned etcd fail instead of hanging; each member gets a channel
of its own and the client chooses the member of each attempt (a frozen member's
connection still looks READY to gRPC, so a round-robin channel keeps sending
calls there); leases are refreshed over one shared LeaseKeepAlive stream (aetcd
opens a stream per refresh).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aetcd
import aetcd.client
import aetcd.exceptions
import aetcd.rpc
import aetcd.utils

from ..config import EtcdSettings, parse_endpoints
from ..errors import AgentExists, LeaseNotFound, RegistryUnavailable, RevisionCompacted
from .channel import (
    CHANNEL_OPTIONS,
    Member,
    MemberClient,
    PageTooLarge,
    TlsFiles,
    grpc_target,
    is_ip,
    range_page,
    retryable,
    translate,
)
from .streams import KeepAliveStream, WatchEvent, WatchStream, reset_watcher

__all__ = ["EtcdClient", "KeyValue", "TlsFiles", "WatchEvent", "WatchStream", "grpc_target"]

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int


_TRANSACTIONS = aetcd.client.Transactions()


def _consume(task: asyncio.Task[Any]) -> None:
    """Retrieve a finished attempt's exception (a lost hedge is not an unhandled error)."""
    if not task.cancelled():
        task.exception()


class EtcdClient:
    """Async etcd v3 access with timeouts, typed errors and a shared keepalive stream."""

    @classmethod
    def from_settings(cls, settings: EtcdSettings) -> EtcdClient:
        """A client for the ``etcd`` section of the settings (endpoints, timeouts, auth, TLS)."""
        tls = TlsFiles(settings.ca_file, settings.cert_file, settings.key_file) if settings.tls else None
        return cls(settings.endpoints, timeout=settings.request_timeout, username=settings.username,
                   password=settings.password, dial_timeout=settings.dial_timeout, tls=tls)

    def __init__(self, endpoints: Sequence[str], *, timeout: float = 5.0,
                 username: str = "", password: str = "", max_inflight: int = 256,
                 dial_timeout: float | None = None, tls: TlsFiles | None = None) -> None:
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._credentials = tls.credentials() if tls is not None else None
        self._auth = (username or None, password or None)
        self._connect_wait = int(max(dial_timeout or timeout, 1))
        parsed = parse_endpoints(endpoints)
        # One DNS name (a Kubernetes headless service) is followed by gRPC's resolver; a list is synced.
        self._named = len(parsed) == 1 and not is_ip(parsed[0][0])
        # A channel per member (as etcd clientv3's balancer sees each endpoint): attempts go where
        # the client decides, first to the member that answered last, which spreads a fleet over
        # the members since each sidecar starts on a random one.
        self._members = [self._dial(address) for address in dict.fromkeys(parsed)]
        self._preferred = random.choice(self._members)
        self._retired: set[asyncio.Task[None]] = set()
        self._attempt_timeout = max(0.5, timeout / 3)
        self._keepalive: KeepAliveStream | None = None
        self._keepalive_member: Member | None = None
        # Bounded in-flight unary calls: a burst of thousands of registrations is queued here
        # instead of pushing etcd into "too many requests".
        self._inflight = asyncio.Semaphore(max_inflight)

    def _dial(self, address: tuple[str, int]) -> Member:
        # aetcd builds its target as f"{host}:{port}"; split ours at the last colon.
        host, _, port = grpc_target([address]).rpartition(":")
        options = dict(CHANNEL_OPTIONS)
        if self._credentials is not None:
            # The certificates must be valid for the endpoint's host name (or address).
            options["grpc.ssl_target_name_override"] = address[0]
        return Member(address, MemberClient(host=host, port=int(port), username=self._auth[0],
                                        password=self._auth[1], timeout=self.timeout, options=options,
                                        connect_wait_timeout=self._connect_wait, credentials=self._credentials))

    def _pick(self, tried: Collection[Member] = ()) -> Member:
        """The member for the next attempt: the preferred one unless it is suspect or was tried already."""
        members = self._members
        start = members.index(self._preferred) if self._preferred in members else 0
        order = [m for m in members[start:] + members[:start] if m not in tried] or members
        now = time.monotonic()
        for member in order:
            if member.suspect_until <= now:
                return member
        return min(order, key=lambda m: m.suspect_until)

    def _answered(self, member: Member) -> None:
        member.suspect_until = 0.0
        self._preferred = member

    def _suspect(self, member: Member) -> None:
        """Steer attempts away from ``member`` for a request timeout (it is frozen, cut off, dead or electing)."""
        member.suspect_until = time.monotonic() + self.timeout

    async def sync_members(self) -> bool:
        """Dial the cluster's current members from now on (etcd clientv3's AutoSync); whether that changed.

        Members added since start are learnt (a channel each), removed ones dropped, so
        that a sidecar outlives every member it was started with. Calls in flight on a
        removed member's channel finish (or are retried on another); watches and
        keepalives move over by their own retry.
        """
        if self._named:
            return False

        async def member_list(client: MemberClient) -> Any:
            await client.connect()
            return await client.clusterstub.MemberList(aetcd.rpc.MemberListRequest(), timeout=self.timeout,
                                                       metadata=client.metadata)

        response = await self._call(member_list)
        voters = [m for m in response.members if not m.isLearner]
        if any(not m.clientURLs for m in voters):
            return False  # a member still joining has not published its URLs: ask again next time
        urls = sorted({url for m in voters for url in m.clientURLs})
        if not urls or urls == sorted(self.endpoints):
            return False
        known = {m.address: m for m in self._members}
        members = [known.get(address) or self._dial(address) for address in dict.fromkeys(parse_endpoints(urls))]
        retired = [m for m in self._members if m not in members]
        log.info("etcd members now %s (were %s)", ", ".join(urls), ", ".join(self.endpoints))
        self._members, self.endpoints = members, urls
        if self._preferred not in members:
            self._preferred = random.choice(members)
        if self._keepalive is not None and self._keepalive_member in retired:
            keepalive, self._keepalive = self._keepalive, None
            await keepalive.close()
        # Let calls in flight on a removed member's channel finish before closing it.
        loop = asyncio.get_running_loop()
        for member in retired:
            task = loop.create_task(self._close_later(member.client, self.timeout))
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)
        return True

    @staticmethod
    async def _close_later(client: MemberClient, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await client.close()
        except Exception:
            log.debug("closing a retired etcd channel failed", exc_info=True)

    async def run_member_sync(self, interval: float) -> None:
        """``sync_members`` every ``interval`` seconds, forever (a failed sync is tried again next time)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sync_members()
            except RegistryUnavailable as exc:
                log.debug("etcd member sync failed: %s", exc)

    async def close(self) -> None:
        for task in list(self._retired):
            task.cancel()
        if self._keepalive is not None:
            await self._keepalive.close()
            self._keepalive = None
        for member in self._members:
            try:
                await member.client.close()
            except Exception:  # closing a broken channel must not mask the caller's error
                log.debug("etcd client close failed", exc_info=True)

    async def _reconnect(self, member: Member) -> None:
        try:
            await member.client.close()
        except Exception:
            log.debug("etcd client close before re-authentication failed", exc_info=True)
        if self._keepalive is not None and self._keepalive_member is member:
            await self._keepalive.close()
            self._keepalive = None

    async def _call(self, method: str | Callable[..., Awaitable[Any]], *args: Any, hedge: bool = True,
                    **kwargs: Any) -> Any:
        """One unary call, retried until it succeeds or ``timeout`` runs out; errors typed.

        ``method`` is an aetcd client method name, or a function given the member's
        client first. An attempt goes to the member that answered last; one that fails
        is retried at once on another member (a member that died, a follower without
        a leader). An attempt without an answer after a third of the deadline (a frozen
        or cut-off member, a leader being replaced) marks its member suspect and is
        hedged: another attempt goes to another member (then one every sixth of the
        deadline) while the first one keeps its chance until the deadline, so a
        legitimately slow call (a range read of 100,000 agents) is not cut short; the
        first answer wins and the others are cancelled
        (``hedge=False``: the slow attempt is cancelled instead, for calls that open a
        stream). Every caller is safe to send twice: reads, puts of a whole value and
        deletes are idempotent; leases are granted under an id chosen here (a second
        grant of one says "lease already exists"), and a compare-and-swap that landed is
        recognised by its value (``put_if``) or its lease (``put_owned``).
        """
        loop = asyncio.get_running_loop()
        async with self._inflight:
            deadline = loop.time() + self.timeout
            delay = 0.02
            tried: list[Member] = []
            running: dict[asyncio.Task[Any], tuple[Member, float]] = {}
            launch_at = loop.time()
            failed: tuple[BaseException, BaseException] | None = None  # the last failure, translated and raw
            try:
                while (now := loop.time()) < deadline:
                    if now >= launch_at:
                        for task, (member, started) in list(running.items()):
                            if now - started >= self._attempt_timeout * 0.999:
                                log.debug("etcd attempt on %s:%d: no answer after %.2fs",
                                          *member.address, now - started)
                                self._suspect(member)
                                if not hedge:
                                    task.cancel()
                                    del running[task]
                                    await asyncio.wait({task}, timeout=2.0)  # its clean-up first
                        member = self._pick(tried)
                        tried.append(member)
                        task = loop.create_task(self._attempt(member, method, args, kwargs))
                        task.add_done_callback(_consume)
                        running[task] = (member, now)
                        # After the first hedge, every half of that: a leader elected late in the deadline
                        # (or a member thawed) is found by an attempt that starts soon enough.
                        launch_at = now + (self._attempt_timeout if len(tried) == 1 else self._attempt_timeout / 2)
                    wait = max(0.0, min(launch_at, deadline) - loop.time())
                    if not running:
                        await asyncio.sleep(wait)
                        continue
                    done, _ = await asyncio.wait(running, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        member, _started = running.pop(task)
                        cause = task.exception()
                        if cause is None:
                            self._answered(member)
                            return task.result()
                        error = translate(cause)
                        if "invalid auth token" in str(error).lower():
                            # etcd's simple tokens expire: authenticate again on a fresh channel.
                            await self._reconnect(member)
                        if not retryable(error) or (loop.time() + delay >= deadline and not running):
                            if error is cause:
                                raise error
                            raise error from cause
                        log.debug("etcd attempt on %s:%d failed: %s", *member.address, error)
                        self._suspect(member)
                        failed = (error, cause)
                        # Failed fast: the next attempt soon, on another member.
                        launch_at = min(launch_at, loop.time() + delay * random.uniform(0.5, 1.5))
                        delay = min(delay * 2, 0.5)
            finally:
                for task in running:
                    task.cancel()
                stalled = bool(running)
        if failed is not None and not stalled:
            error, cause = failed
            if error is cause:
                raise error
            raise error from cause
        raise RegistryUnavailable(f"etcd: TimeoutError: no answer within {self.timeout:g}s "
                                  f"({len(tried)} attempts on {len(set(tried))} members)")

    @staticmethod
    async def _attempt(member: Member, method: str | Callable[..., Awaitable[Any]], args: Sequence[Any],
                       kwargs: dict[str, Any]) -> Any:
        call = getattr(member.client, method) if isinstance(method, str) else method
        return await (call(*args, **kwargs) if isinstance(method, str) else call(member.client, *args, **kwargs))

    async def get_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """Every key under ``prefix`` and the store revision they were read at."""
        result = await self._call("get_prefix", prefix.encode())
        return result.header.revision, [
            KeyValue(kv.key.decode(errors="replace"), kv.value, kv.mod_revision, kv.lease) for kv in result.kvs
        ]

    # Keys per Range request of a paged list (list_pages).
    LIST_PAGE = 5000

    async def list_pages(self, prefix: str, page_size: int = LIST_PAGE) -> AsyncIterator[tuple[int, list[KeyValue]]]:
        """Every key under ``prefix`` as of one revision, a page at a time: (that revision, the page's keys).

        The first Range reads the newest revision; each later one reads at that same revision, from
        just after the last key seen (clientv3's WithLimit + WithRev, as Kubernetes' reflector lists),
        so the pages make one consistent list however long they take: keys written meanwhile are the
        watch's, from revision + 1. No single response has to fit the gRPC message limit; a page that
        still does not (large values) is asked again with half as many keys. A compaction past that
        revision between two pages raises RevisionCompacted: the caller lists again. Each page is one
        call with its own deadline and retries.
        """
        start, end = prefix.encode(), aetcd.utils.prefix_range_end(prefix.encode())
        revision, limit = 0, max(1, page_size)
        while True:
            try:
                response = await self._call(range_page, start, end, limit, revision, self.timeout)
            except PageTooLarge:
                limit = max(1, limit // 2)
                log.info("a page of %s did not fit a gRPC message; asking for %d keys a page", prefix, limit)
                continue
            revision = revision or response.header.revision
            yield revision, [KeyValue(kv.key.decode(errors="replace"), kv.value, kv.mod_revision, kv.lease)
                             for kv in response.kvs]
            if not response.more or not response.kvs:
                return
            start = response.kvs[-1].key + b"\x00"

    async def get(self, key: str) -> KeyValue | None:
        result = await self._call("get", key.encode())
        if result is None:
            return None
        return KeyValue(key, result.value, result.mod_revision, result.lease)

    async def get_at(self, key: str, revision: int = 0) -> KeyValue | None:
        """``key`` as it was at ``revision`` (0: now); raises RevisionCompacted when that is gone."""
        async def read(client: MemberClient) -> Any:
            await client.connect()
            request = aetcd.rpc.RangeRequest(key=key.encode(), revision=revision)
            return await client.kvstub.Range(request, timeout=self.timeout, metadata=client.metadata)

        response = await self._call(read)
        if not response.kvs:
            return None
        kv = response.kvs[0]
        return KeyValue(key, kv.value, kv.mod_revision, kv.lease)

    async def history(self, key: str, limit: int = 50) -> list[KeyValue]:
        """The stored versions of ``key``, newest first, back to its creation or etcd's compaction point."""
        versions: list[KeyValue] = []
        current = await self.get_at(key)
        while current is not None and len(versions) < limit:
            versions.append(current)
            if current.mod_revision <= 1:
                break
            try:
                current = await self.get_at(key, current.mod_revision - 1)
            except RevisionCompacted:
                break
        return versions

    async def put_if(self, key: str, value: bytes, mod_revision: int) -> int | None:
        """Write ``key`` only if its mod revision is still ``mod_revision`` (0: the key must not exist).

        Returns the new revision, or None when someone else wrote it first.
        """
        transactions = _TRANSACTIONS
        succeeded, responses = await self._call("transaction",
                                                compare=[transactions.mod(key.encode()) == mod_revision],
                                                success=[transactions.put(key.encode(), value)], failure=[])
        if succeeded:
            return int(responses[0].response_put.header.revision)
        # Lost the compare, or an earlier attempt of this very call landed: the value tells which.
        current = await self.get_at(key)
        if current is not None and current.value == value and current.mod_revision > mod_revision:
            return current.mod_revision
        return None

    async def put_owned(self, key: str, value: bytes, lease: int, mine: Collection[int]) -> int:
        """Write ``key`` under ``lease`` if it is absent or held by one of the leases in ``mine``.

        Raises AgentExists when another owner's lease holds it (a compare-and-swap on
        create, so one agent id cannot be taken over); returns the revision.
        """
        transactions = _TRANSACTIONS
        for _ in range(8):
            created, responses = await self._call(
                "transaction", compare=[transactions.create(key.encode()) == 0],
                success=[transactions.put(key.encode(), value, lease=lease)], failure=[transactions.get(key.encode())])
            if created:
                return int(responses[0].response_put.header.revision)
            found = responses[0]
            if not found:
                continue  # deleted in between: try creating again
            existing = found[0][1]
            if existing.lease != lease and existing.lease not in mine:
                raise AgentExists(key, existing.lease)
            replaced, responses = await self._call(
                "transaction", compare=[transactions.mod(key.encode()) == existing.mod_revision],
                success=[transactions.put(key.encode(), value, lease=lease)], failure=[])
            if replaced:
                return int(responses[0].response_put.header.revision)
        raise RegistryUnavailable(f"etcd: {key} kept changing while it was being written")

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write ``key``; with ``lease`` the key dies with the lease. Returns the revision."""
        result = await self._call("put", key.encode(), value, lease=lease or None)
        return int(result.header.revision)

    async def delete(self, key: str) -> bool:
        return await self._call("delete", key.encode()) is not None

    @staticmethod
    def new_lease_id() -> int:
        """A lease id of this client's choosing (62 random bits: no two clients pick the same)."""
        return random.getrandbits(62) + 1

    async def grant(self, ttl: int, lease_id: int = 0) -> int:
        """A lease of ``ttl`` seconds under ``lease_id`` (0: a new id); returns its id.

        The id is chosen here, so that a retried grant whose first attempt landed
        finds its own lease ("already exists") instead of leaving an orphan behind;
        a caller that grants again later under the same id (a pending registration)
        gets the lease back if it still lives, or a new one under that id.
        """
        lease_id = lease_id or self.new_lease_id()

        async def grant_once(client: MemberClient) -> int:
            try:
                lease = await client.lease(ttl, lease_id)
            except aetcd.exceptions.DuplicateLeaseError:
                return lease_id
            return int(lease.id)

        return await self._call(grant_once)

    async def revoke(self, lease_id: int) -> None:
        """Revoke a lease (its keys are deleted); a lease already gone is not an error."""
        try:
            await self._call("revoke_lease", lease_id)
        except LeaseNotFound:
            pass

    async def refresh(self, lease_id: int, timeout: float | None = None) -> int:
        """Keep a lease alive; returns the granted TTL, raises LeaseNotFound if it is gone.

        An answer that does not come within ``timeout`` (at most one attempt's timeout)
        closes the shared stream: it is stuck on a member that stopped answering
        (frozen, partitioned), which gRPC's own keepalive notices only after ~8 s, long
        enough for short leases to expire. That member becomes suspect, so the next
        refresh opens a stream on another member.
        """
        if self._keepalive is None or self._keepalive.closed:
            if self._keepalive is not None and self._keepalive_member is not None:
                self._suspect(self._keepalive_member)  # the stream broke (a dead or cut-off member)
            self._keepalive_member = self._pick()
            self._keepalive = KeepAliveStream(self._keepalive_member.client)
        stream, member = self._keepalive, self._keepalive_member
        limit = min(timeout or self._attempt_timeout, self._attempt_timeout)
        try:
            ttl = await asyncio.wait_for(stream.refresh(lease_id), limit)
        except TimeoutError:
            if self._keepalive is stream:
                self._keepalive = None
            if member is not None:
                self._suspect(member)
            await stream.close()
            raise RegistryUnavailable(f"etcd keepalive of lease {lease_id:x}: no answer within {limit:g}s") from None
        if member is not None and member.suspect_until:
            member.suspect_until = 0.0
        return ttl

    async def watch_prefix(self, prefix: str, start_revision: int) -> WatchStream:
        """An established watch on ``prefix`` from ``start_revision`` on.

        Iterating it yields batches of changes; it raises RevisionCompacted when
        that revision is gone and RegistryUnavailable when the stream breaks.
        """
        async def create(client: MemberClient) -> Any:
            try:
                return await client.watch(prefix.encode(), range_end=aetcd.utils.prefix_range_end(prefix.encode()),
                                          start_revision=start_revision, progress_notify=True)
            except aetcd.exceptions.RevisionCompactedError:
                raise  # answered: nothing left in flight
            except BaseException:
                # aetcd gives a "created" answer to whichever watch is being created when it comes: the
                # answer to this abandoned request would go to the next watch on the stream (another
                # prefix's events delivered to it, forever). End the stream: its watches start again.
                await reset_watcher(client)
                raise

        # Not hedged: a second attempt would leave a watch behind on the first member.
        return WatchStream(await self._call(create, hedge=False))
