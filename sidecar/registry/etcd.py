"""The one module that talks to etcd (through aetcd); everything else uses EtcdClient.

Facts this wrapper handles (aetcd 1.0 against etcd 3.4): every call carries a
timeout (a frozen etcd otherwise blocks forever); gRPC keepalive pings make a
watch on a partitioned etcd fail instead of hanging; several endpoints become
one gRPC target with the round_robin policy; leases are refreshed over one
shared LeaseKeepAlive stream (aetcd opens a stream per refresh).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.utils
import aetcd.watcher
import grpc
import grpc.aio

from ..config import EtcdSettings, parse_endpoints
from ..errors import AgentExists, ConfigError, LeaseNotFound, RegistryBusy, RegistryUnavailable, RevisionCompacted

log = logging.getLogger(__name__)
T = TypeVar("T")

_CHANNEL_OPTIONS = {
    # etcd's server enforces pings at most every 5 s, and none without an active stream
    # (else GOAWAY "too_many_pings"): 6 s, only while a watch or keepalive stream is open.
    "grpc.keepalive_time_ms": 6000,
    "grpc.keepalive_timeout_ms": 2000,
    "grpc.http2.ping_timeout_ms": 2000,
    "grpc.keepalive_permit_without_calls": 0,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.lb_policy_name": "round_robin",
    # The sidecar's own etcd traffic never goes through an HTTP_PROXY from the environment.
    "grpc.enable_http_proxy": 0,
    "grpc.initial_reconnect_backoff_ms": 200,
    # A DNS name (a Kubernetes headless service) is resolved again within a second of a failure,
    # e.g. at pod start, before the pod's own DNS (this sidecar) answers.
    "grpc.dns_min_time_between_resolutions_ms": 1000,
    "grpc.max_reconnect_backoff_ms": 2000,
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
}


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change under a watched prefix; ``value`` is empty for a delete."""

    deleted: bool
    key: str
    value: bytes
    revision: int


def grpc_target(endpoints: Sequence[tuple[str, int]]) -> str:
    """One gRPC target naming every endpoint (resolving host names once)."""
    if len(endpoints) == 1 and not _is_ip(endpoints[0][0]):
        host, port = endpoints[0]
        return f"dns:///{host}:{port}"
    addresses: list[tuple[int, str]] = []
    for host, port in endpoints:
        if _is_ip(host):
            addresses.append((ipaddress.ip_address(host).version, _hostport(host, port)))
            continue
        for family, *_, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            version = 6 if family == socket.AF_INET6 else 4
            addresses.append((version, _hostport(str(sockaddr[0]), port)))
    version = addresses[0][0]
    same = [a for v, a in addresses if v == version]
    return f"ipv{version}:" + ",".join(dict.fromkeys(same))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for TLS to etcd: the CA (empty: the system's roots) and an optional client pair."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str) -> bytes | None:
            if not path:
                return None
            try:
                with open(path, "rb") as handle:
                    return handle.read()
            except OSError as exc:
                raise ConfigError("etcd TLS file", path, f"cannot read: {exc.strerror}") from None

        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))


class _Client(aetcd.Client):
    """aetcd's client over a TLS channel when given credentials (aetcd itself only dials plaintext)."""

    def __init__(self, *, credentials: grpc.ChannelCredentials | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._credentials is None or self._connected.is_set() or getattr(self, "_is_connecting", False):
            await super().connect()
            return
        # The same steps as aetcd's connect, on a secure channel.
        self._is_connecting = True
        try:
            self.channel = grpc.aio.secure_channel(f"{self._host}:{self._port}", self._credentials,
                                                   options=list(self._options.items()))
            if self._username is not None and self._password is not None:
                self.auth_stub = aetcd.rpc.AuthStub(self.channel)
                request = aetcd.rpc.AuthenticateRequest(name=self._username, password=self._password)
                response = await self.auth_stub.Authenticate(request, timeout=self._timeout)
                self.metadata = (("token", response.token),)
            self.kvstub = aetcd.rpc.KVStub(self.channel)
            self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
            self.leasestub = aetcd.rpc.LeaseStub(self.channel)
            self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(aetcd.rpc.WatchStub(self.channel), timeout=self._timeout,
                                                  metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False


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
        self._client = self._dial(grpc_target(parse_endpoints(endpoints)), parse_endpoints(endpoints)[0][0])
        # One DNS name (a Kubernetes headless service) is followed by gRPC's resolver; a list is synced.
        self._named = grpc_target(parse_endpoints(endpoints)).startswith("dns:")
        self._retired: set[asyncio.Task[None]] = set()
        self._attempt_timeout = max(0.5, timeout / 3)
        self._keepalive: _KeepAliveStream | None = None
        # Bounded in-flight unary calls: a burst of thousands of registrations is queued here
        # instead of pushing etcd into "too many requests".
        self._inflight = asyncio.Semaphore(max_inflight)

    def _dial(self, target: str, tls_name: str) -> _Client:
        # aetcd builds its target as f"{host}:{port}"; split ours at the last colon.
        host, _, port = target.rpartition(":")
        options = dict(_CHANNEL_OPTIONS)
        if self._credentials is not None:
            # Several endpoints become one target: the certificates must be valid for this name.
            options["grpc.ssl_target_name_override"] = tls_name
        return _Client(host=host, port=int(port), username=self._auth[0], password=self._auth[1],
                       timeout=self.timeout, options=options, connect_wait_timeout=self._connect_wait,
                       credentials=self._credentials)

    async def sync_members(self) -> bool:
        """Dial the cluster's current members from now on (etcd clientv3's AutoSync); whether that changed.

        Members added since start are learnt, removed ones dropped, so that a sidecar
        outlives every member it was started with. Calls in flight on the old channel
        finish (or are retried on the new one); watches and keepalives move over by
        their own retry.
        """
        if self._named:
            return False

        async def member_list() -> Any:
            await self._client.connect()
            return await self._client.clusterstub.MemberList(aetcd.rpc.MemberListRequest(), timeout=self.timeout,
                                                             metadata=self._client.metadata)

        response = await self._call(member_list)
        voters = [m for m in response.members if not m.isLearner]
        if any(not m.clientURLs for m in voters):
            return False  # a member still joining has not published its URLs: ask again next time
        urls = sorted({url for m in voters for url in m.clientURLs})
        if not urls or urls == sorted(self.endpoints):
            return False
        loop = asyncio.get_running_loop()
        # Resolved off the event loop (a member may advertise a host name).
        target = await loop.run_in_executor(None, grpc_target, parse_endpoints(urls))
        old, self._client = self._client, self._dial(target, parse_endpoints(urls)[0][0])
        log.info("etcd members now %s (were %s)", ", ".join(urls), ", ".join(self.endpoints))
        self.endpoints = urls
        if self._keepalive is not None:
            keepalive, self._keepalive = self._keepalive, None
            await keepalive.close()
        # Let calls in flight on the old channel finish before closing it.
        task = loop.create_task(self._close_later(old, self.timeout))
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)
        return True

    @staticmethod
    async def _close_later(client: _Client, delay: float) -> None:
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
        try:
            await self._client.close()
        except Exception:  # closing a broken channel must not mask the caller's error
            log.debug("etcd client close failed", exc_info=True)

    async def _reconnect(self) -> None:
        try:
            await self._client.close()
        except Exception:
            log.debug("etcd client close before re-authentication failed", exc_info=True)
        if self._keepalive is not None:
            await self._keepalive.close()
            self._keepalive = None

    async def _call(self, method: str | Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        """One unary call, retried until it succeeds or ``timeout`` runs out; errors typed.

        ``method`` is an aetcd client method name, or a function that uses ``self._client``.
        Each attempt gets a third of the deadline, so a member that died with the call
        in flight (or a follower waiting out an election) costs one attempt, not the
        whole deadline; the round-robin channel sends the next attempt to another member.
        Every caller is safe to retry: reads, puts of a whole value and deletes are
        idempotent; leases are granted under an id chosen here (a retry of a grant that
        did land says "lease already exists"), and a compare-and-swap that landed is
        recognised by its value (``put_if``).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        delay = 0.02
        while True:
            attempt = max(0.05, min(deadline - loop.time(), self._attempt_timeout))
            async with self._inflight:
                # A method name is looked up per attempt: the member sync may have replaced the client.
                call = getattr(self._client, method) if isinstance(method, str) else method
                try:
                    return await asyncio.wait_for(call(*args, **kwargs), attempt)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    cause, error = exc, _translate(exc)
            if "invalid auth token" in str(error).lower():
                # etcd's simple tokens expire: authenticate again on a fresh channel.
                await self._reconnect()
            if _retryable(error) and loop.time() + delay < deadline:
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 0.5)
                continue
            if error is cause:
                raise error
            raise error from cause

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
                response = await self._call(self._range_page, start, end, limit, revision)
            except _PageTooLarge:
                limit = max(1, limit // 2)
                log.info("a page of %s did not fit a gRPC message; asking for %d keys a page", prefix, limit)
                continue
            revision = revision or response.header.revision
            yield revision, [KeyValue(kv.key.decode(errors="replace"), kv.value, kv.mod_revision, kv.lease)
                             for kv in response.kvs]
            if not response.more or not response.kvs:
                return
            start = response.kvs[-1].key + b"\x00"

    async def _range_page(self, start: bytes, end: bytes, limit: int, revision: int) -> Any:
        await self._client.connect()
        request = aetcd.rpc.RangeRequest(key=start, range_end=end, limit=limit, revision=revision)
        try:
            return await self._client.kvstub.Range(request, timeout=self.timeout, metadata=self._client.metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and limit > 1:
                raise _PageTooLarge(str(exc.details())) from exc
            raise

    async def get(self, key: str) -> KeyValue | None:
        result = await self._call("get", key.encode())
        if result is None:
            return None
        return KeyValue(key, result.value, result.mod_revision, result.lease)

    async def get_at(self, key: str, revision: int = 0) -> KeyValue | None:
        """``key`` as it was at ``revision`` (0: now); raises RevisionCompacted when that is gone."""
        async def read() -> Any:
            await self._client.connect()
            request = aetcd.rpc.RangeRequest(key=key.encode(), revision=revision)
            return await self._client.kvstub.Range(request, timeout=self.timeout, metadata=self._client.metadata)

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
        transactions = self._client.transactions
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
        transactions = self._client.transactions
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

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; returns its id.

        The id is chosen here, so that a retried grant whose first attempt landed
        finds its own lease ("already exists") instead of leaving an orphan behind.
        """
        lease_id = random.getrandbits(62) + 1

        async def grant_once() -> int:
            try:
                lease = await self._client.lease(ttl, lease_id)
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
        enough for short leases to expire. The next refresh opens a stream that the
        round-robin channel places on another member.
        """
        if self._keepalive is None or self._keepalive.closed:
            self._keepalive = _KeepAliveStream(self._client)
        stream = self._keepalive
        limit = min(timeout or self._attempt_timeout, self._attempt_timeout)
        try:
            return await asyncio.wait_for(stream.refresh(lease_id), limit)
        except TimeoutError:
            if self._keepalive is stream:
                self._keepalive = None
            await stream.close()
            raise RegistryUnavailable(f"etcd keepalive of lease {lease_id:x}: no answer within {limit:g}s") from None

    async def watch_prefix(self, prefix: str, start_revision: int) -> WatchStream:
        """An established watch on ``prefix`` from ``start_revision`` on.

        Iterating it yields batches of changes; it raises RevisionCompacted when
        that revision is gone and RegistryUnavailable when the stream breaks.
        """
        watch = await self._call("watch", prefix.encode(),
                                 range_end=aetcd.utils.prefix_range_end(prefix.encode()),
                                 start_revision=start_revision, progress_notify=True)
        return WatchStream(watch)


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
                self._error = _translate(item)
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
            pass


class _PageTooLarge(Exception):
    """A Range response over the gRPC message limit (not retried as is: list_pages halves the page)."""


def _retryable(error: BaseException) -> bool:
    if not isinstance(error, RegistryUnavailable):
        return False
    text = str(error).lower()
    return not any(word in text for word in ("permission denied", "authentication failed", "user name is empty"))


def _translate(exc: BaseException) -> BaseException:
    if isinstance(exc, aetcd.exceptions.RevisionCompactedError):
        return RevisionCompacted(exc.compacted_revision)
    text = str(exc).lower()
    if "required revision has been compacted" in text:
        return RevisionCompacted(0)
    if "too many requests" in text:
        return RegistryBusy(f"etcd: {exc}")
    if "lease not found" in text or "requested lease not found" in text:
        return LeaseNotFound(str(exc))
    if isinstance(exc, (aetcd.exceptions.ClientError, grpc.RpcError, asyncio.TimeoutError,
                        ConnectionError, OSError)):
        return RegistryUnavailable(f"etcd: {type(exc).__name__}: {exc}")
    return exc


class _KeepAliveStream:
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
            self._fail(RegistryUnavailable(f"etcd keepalive stream: {_translate(exc)}"))

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
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
