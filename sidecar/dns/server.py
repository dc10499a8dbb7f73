"""The DNS component: builds answers, forwarder and listeners from settings; start/stop."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence

from ..catalog import Catalog, Event, Snapshot
from ..config import FORWARDING_OFF, DnsSettings, HostPort
from ..metrics import DnsMetrics
from .answers import Answers
from .forward import Forwarder, resolv_conf_upstreams
from .forward_cache import ForwardCache
from .resolver import IPAddress, Zone
from .transport import Handler, TcpConnection, UdpServer

log = logging.getLogger(__name__)

# Attempts to find a port free for both UDP and TCP when listening on port 0.
_PORT_ATTEMPTS = 20


def _ip_or_none(host: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return None if ip.is_unspecified else ip


def upstreams_from(settings: DnsSettings, listen: tuple[str, int],
                   resolv_conf: str = "/etc/resolv.conf") -> list[tuple[str, int]] | None:
    """The upstream resolvers: the configured ones, else resolv.conf's; None when forwarding is off."""
    if tuple(u.lower() for u in settings.upstreams) == (FORWARDING_OFF,):
        return None
    if settings.upstreams:
        return [(a.host, a.port) for a in (HostPort.parse(u, "dns.upstreams", default_port=53)
                                           for u in settings.upstreams)]
    return resolv_conf_upstreams(listen, resolv_conf)


class DnsServer:
    """Serves the zone over UDP and TCP on ``settings.listen`` and forwards the other names."""

    def __init__(self, settings: DnsSettings, catalog: Catalog, metrics: DnsMetrics, *, local_zone: str = "",
                 proxy_listen: str = "", resolv_conf: str = "/etc/resolv.conf", panic: bool = False) -> None:
        self.catalog = catalog
        self.metrics = metrics
        self.host, self.port = HostPort.parse(settings.listen, "dns.listen")
        self._local_zone = local_zone
        self._proxy_listen = proxy_listen
        self._resolv_conf = resolv_conf
        self._panic = panic
        self.handler = Handler(*self._build(settings), metrics)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: set[TcpConnection] = set()
        self._unsubscribe: Callable[[], None] | None = None

    def _build(self, settings: DnsSettings) -> tuple[Answers, Forwarder | None]:
        self.settings = settings
        upstreams = upstreams_from(settings, (self.host, self.port), self._resolv_conf)
        if upstreams == []:
            log.warning("no upstream DNS resolvers: names outside %s get REFUSED", settings.domain)
        self.upstreams: Sequence[tuple[str, int]] = upstreams or ()
        proxy_address = None
        if settings.a_mode == "proxy":
            proxy_address = _ip_or_none(HostPort.parse(self._proxy_listen).host) if self._proxy_listen else None
            if proxy_address is None:
                log.warning("dns.a_mode=proxy needs a proxy listen IP address (got %r); answering directly",
                            self._proxy_listen)
        self.zone = Zone(domain=settings.domain, ttl=settings.ttl, negative_ttl=settings.negative_ttl,
                         local_zone=self._local_zone, proxy_address=proxy_address,
                         ns_address=_ip_or_none(self.host), panic=self._panic)
        forward_cache = None
        if self.upstreams and settings.cache_size:
            forward_cache = ForwardCache(settings.cache_size, settings.cache_max_ttl)
        self.answers = Answers(self.zone, self.catalog.snapshot, self.metrics, forwarding=bool(self.upstreams),
                               max_udp_payload=settings.max_udp_payload, forward_cache=forward_cache)
        forwarder = Forwarder(self.upstreams, settings.upstream_timeout, self.metrics) if self.upstreams else None
        return self.answers, forwarder

    def update(self, settings: DnsSettings, panic: bool | None = None) -> None:
        """Hot-apply TTLs, a_mode, upstreams, forward cache and payload size (listen and domain need a restart).

        The next query is answered with the new settings; forwards in flight finish on the old upstreams.
        """
        if panic is not None:
            self._panic = panic
        old = self.handler.forwarder
        answers, forwarder = self._build(settings)
        self.handler.answers, self.handler.forwarder = answers, forwarder
        if old is not None:
            asyncio.get_running_loop().call_later(settings.upstream_timeout + 1, old.close)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port), the same port for UDP and TCP (known after start)."""
        return self.host, self.port

    def _on_snapshot(self, snapshot: Snapshot, events: Sequence[Event]) -> None:
        self.answers.update(snapshot)

    async def start(self) -> None:
        """Bind UDP and TCP on one port and follow the catalog's snapshots."""
        self._unsubscribe = self.catalog.subscribe(self._on_snapshot)
        self.answers.update(self.catalog.snapshot)
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        attempts = _PORT_ATTEMPTS if self.port == 0 else 1
        for attempt in range(attempts):
            udp, protocol = await loop.create_datagram_endpoint(
                lambda: UdpServer(self.handler, self.settings.udp_receive_buffer), local_addr=(self.host, self.port),
                family=family)
            port = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await loop.create_server(
                    lambda: TcpConnection(self.handler, self.settings.tcp_idle_timeout, self._connections),
                    self.host, port, family=family, reuse_address=True, backlog=1024)
            except OSError as exc:
                udp.close()
                if exc.errno != errno.EADDRINUSE or attempt == attempts - 1:
                    raise
                continue
            self._udp = udp  # type: ignore[assignment]
            self.port = port
            break
        self._note_receive_buffer(protocol)
        log.info("DNS for %s on %s:%d (UDP+TCP), upstreams %s", self.zone.domain, self.host, self.port,
                 ", ".join(f"{h}:{p}" for h, p in self.upstreams) or "none")

    def _note_receive_buffer(self, protocol: UdpServer) -> None:
        """Expose the UDP listener's granted receive buffer and its kernel drop count; warn when capped."""
        requested, granted = self.settings.udp_receive_buffer, protocol.granted_buffer
        self.metrics.udp_listener(granted, protocol.drops)
        # Linux reports twice the size it granted: below the request means net.core.rmem_max capped it.
        if requested and granted < requested:
            log.warning("DNS UDP receive buffer: asked for %d bytes, the kernel gave %d (raise net.core.rmem_max "
                        "to absorb longer bursts)", requested, granted)
        else:
            log.info("DNS UDP receive buffer: %d bytes (asked for %d)", granted, requested)

    async def stop(self) -> None:
        """Close the listeners and connections and cancel forwards in flight."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for connection in list(self._connections):
                if connection.transport is not None:
                    connection.transport.close()
            await self._tcp.wait_closed()
            self._tcp = None
        tasks = list(self.handler.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.handler.forwarder is not None:
            self.handler.forwarder.close()
