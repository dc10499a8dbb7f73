"""Channels to etcd members (aetcd clients, TLS) and the typing of what fails on them: used by etcd.py only."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.watcher
import grpc
import grpc.aio

from ..errors import ConfigError, LeaseNotFound, RegistryBusy, RegistryUnavailable, RevisionCompacted

CHANNEL_OPTIONS = {
    # etcd's server enforces pings at most every 5 s, and none without an active stream
    # (else GOAWAY "too_many_pings"): 6 s, only while a watch or keepalive stream is open.
    "grpc.keepalive_time_ms": 6000,
    "grpc.keepalive_timeout_ms": 2000,
    "grpc.http2.ping_timeout_ms": 2000,
    "grpc.keepalive_permit_without_calls": 0,
    "grpc.http2.max_pings_without_data": 0,
    # A member's own channel; a DNS name (a headless service) is balanced over its addresses.
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


def grpc_target(endpoints: Sequence[tuple[str, int]]) -> str:
    """One gRPC target naming every endpoint (resolving host names once)."""
    if len(endpoints) == 1 and not is_ip(endpoints[0][0]):
        host, port = endpoints[0]
        return f"dns:///{host}:{port}"
    addresses: list[tuple[int, str]] = []
    for host, port in endpoints:
        if is_ip(host):
            addresses.append((ipaddress.ip_address(host).version, _hostport(host, port)))
            continue
        for family, *_, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            version = 6 if family == socket.AF_INET6 else 4
            addresses.append((version, _hostport(str(sockaddr[0]), port)))
    version = addresses[0][0]
    same = [a for v, a in addresses if v == version]
    return f"ipv{version}:" + ",".join(dict.fromkeys(same))


def is_ip(host: str) -> bool:
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


class MemberClient(aetcd.Client):
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


class Member:
    """One endpoint's own channel, and until when it is suspect (it timed out or failed lately)."""

    __slots__ = ("address", "client", "suspect_until")

    def __init__(self, address: tuple[str, int], client: MemberClient) -> None:
        self.address = address
        self.client = client
        self.suspect_until = 0.0


def retryable(error: BaseException) -> bool:
    if not isinstance(error, RegistryUnavailable):
        return False
    text = str(error).lower()
    return not any(word in text for word in ("permission denied", "authentication failed", "user name is empty"))


def translate(exc: BaseException) -> BaseException:
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


class PageTooLarge(Exception):
    """A Range response over the gRPC message limit (not retried as is: ``list_pages`` halves the page)."""


async def range_page(client: MemberClient, start: bytes, end: bytes, limit: int, revision: int,
                     timeout: float) -> Any:
    """One page of a paged list: at most ``limit`` keys from ``start`` (before ``end``) at ``revision``."""
    await client.connect()
    request = aetcd.rpc.RangeRequest(key=start, range_end=end, limit=limit, revision=revision)
    try:
        return await client.kvstub.Range(request, timeout=timeout, metadata=client.metadata)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and limit > 1:
            raise PageTooLarge(str(exc.details())) from exc
        raise
