"""Every Prometheus collector, built once per server on its own CollectorRegistry.

Names follow ``sidecar_<subsystem>_<thing>_<unit>``. Components receive the
group they need (``metrics.registry``, ``metrics.dns``...) instead of touching
module globals, so two servers in one process (the tests) never collide.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class RegistryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registrations = Counter(
            "sidecar_registry_registrations_total", "Agent registrations by outcome.",
            ["outcome"], registry=registry)
        self.registration_seconds = Histogram(
            "sidecar_registry_registration_duration_seconds", "Lease grant + put of one registration.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0), registry=registry)
        self.reregistrations = Counter(
            "sidecar_registry_reregistrations_total", "Agents registered again after their lease was lost.",
            registry=registry)
        self.keepalive_failures = Counter(
            "sidecar_registry_keepalive_failures_total", "Lease refreshes that failed.", registry=registry)
        self.owned_agents = Gauge(
            "sidecar_registry_owned_agents", "Agents whose lease this sidecar keeps alive.", registry=registry)
        self.pending_registrations = Gauge(
            "sidecar_registry_pending_registrations",
            "Registrations accepted while etcd was unreachable (202 pending) and not written yet.", registry=registry)
        self.pending_resolved = Counter(
            "sidecar_registry_pending_resolved_total",
            "Pending registrations no longer pending, by outcome (registered, conflict: another owner took the id, "
            "cancelled: deleted, replaced: registered again, error).", ["outcome"], registry=registry)
        self.invalid_values = Counter(
            "sidecar_registry_invalid_values_total", "etcd values skipped because they do not parse.",
            registry=registry)
        self.watch_events = Counter(
            "sidecar_registry_watch_events_total", "Watch events applied, by type.", ["type"], registry=registry)
        self.watch_restarts = Counter(
            "sidecar_registry_watch_restarts_total", "Watch streams restarted, by reason.", ["reason"],
            registry=registry)
        self.relists = Counter(
            "sidecar_registry_relists_total", "Full range reads (start, compaction, reconnect).",
            registry=registry)
        self.snapshot_revision = Gauge(
            "sidecar_registry_snapshot_revision", "etcd revision of the served snapshot.", registry=registry)
        self.snapshot_agents = Gauge(
            "sidecar_registry_snapshot_agents", "Agents in the served snapshot.", registry=registry)
        self.snapshot_healthy_agents = Gauge(
            "sidecar_registry_snapshot_healthy_agents", "Healthy agents in the served snapshot.", registry=registry)
        self.etcd_up = Gauge(
            "sidecar_registry_etcd_up", "1 while the watch on etcd is established.", registry=registry)
        self.stale_seconds = Gauge(
            "sidecar_registry_snapshot_stale_seconds",
            "Seconds since the snapshot was last known current (0 while the watch is up).", registry=registry)
        self.discovery_seconds = Histogram(
            "sidecar_registry_discovery_duration_seconds", "Time to answer a discovery query from the snapshot.",
            buckets=(1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05), registry=registry)


class DnsMetrics:
    """DNS counters as plain ints and dicts, bumped on the query path and turned into families at scrape time.

    A prometheus_client ``labels().inc()`` per query would cost more than the
    cached answer itself, so the query path only does ``counter[key] += 1``, and
    the exact-message cache (the hottest path) only ``exact_hits[slot] += 1``
    on a list whose slots stand for (qtype, rcode) pairs (``slot``); the
    totals are summed at scrape time. The latency histogram is fed a sample of
    the queries (see ``LATENCY_SAMPLE``).
    """

    LATENCY_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 0.01, 0.05, 0.25, 1.0, 5.0)
    # Queries whose ID is a multiple of LATENCY_SAMPLE (a power of two) are timed: one in that many.
    LATENCY_SAMPLE = 64

    def __init__(self, registry: CollectorRegistry) -> None:
        import collections

        self.queries: collections.Counter[tuple[str, str]] = collections.Counter()  # (qtype, rcode)
        self.errors: collections.Counter[str] = collections.Counter()  # error replies we made, by reason
        self.dropped: collections.Counter[str] = collections.Counter()  # messages not answered, by reason
        self.upstream_errors: collections.Counter[tuple[str, str]] = collections.Counter()  # (upstream, reason)
        self.forwarded: collections.Counter[str] = collections.Counter()  # by outcome
        # Queries answered from the exact-message cache, by slot (see ``slot``); not in ``queries``.
        self.exact_hits: list[int] = []
        self._slots: dict[tuple[str, str], int] = {}
        self.cache_hits = 0  # answered by the normalised fast path (the exact cache's are in exact_hits)
        self.cache_misses = 0
        self.cache_invalidations = 0
        self.forward_cache_hits = 0  # forwarded questions answered from the forward cache
        self.forward_cache_misses = 0  # forwarded questions the forward cache did not have
        self.truncated = 0
        self.tcp_connections = 0
        # The UDP listener's SO_RCVBUF as the kernel reports it, and its kernel drop count (see udp_listener).
        self.udp_receive_buffer = 0
        self.udp_receive_drops: Callable[[], int | None] = lambda: None
        self._latency_counts = [0] * (len(self.LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self.forward_seconds = Histogram(
            "sidecar_dns_forward_duration_seconds", "Time to answer a forwarded query (all upstream attempts).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=registry)
        registry.register(self)  # type: ignore[arg-type]

    def udp_listener(self, receive_buffer: int, drops: Callable[[], int | None]) -> None:
        """The UDP listener's SO_RCVBUF as granted, and a reader of its kernel drop count (called at scrape)."""
        self.udp_receive_buffer = receive_buffer
        self.udp_receive_drops = drops

    def slot(self, stat: tuple[str, str]) -> int:
        """The index in ``exact_hits`` that counts queries answered with this (qtype, rcode)."""
        index = self._slots.get(stat)
        if index is None:
            index = self._slots[stat] = len(self.exact_hits)
            self.exact_hits.append(0)
        return index

    def query_totals(self) -> dict[tuple[str, str], int]:
        """Queries answered so far by (qtype, rcode), from every path."""
        totals = dict(self.queries)
        for stat, index in self._slots.items():
            if self.exact_hits[index]:
                totals[stat] = totals.get(stat, 0) + self.exact_hits[index]
        return totals

    def cache_hit_total(self) -> int:
        """Queries answered from a wire cache (the exact-message one or the normalised one)."""
        return self.cache_hits + sum(self.exact_hits)

    def observe_latency(self, seconds: float) -> None:
        """Record one sampled in-zone query's processing time."""
        import bisect

        self._latency_counts[bisect.bisect_left(self.LATENCY_BUCKETS, seconds)] += 1
        self._latency_sum += seconds

    def describe(self) -> list[object]:
        return list(self.collect())

    def collect(self) -> list[object]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        def counter(name: str, doc: str, labels: list[str], values: Mapping[Any, int]) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=labels)
            for key, value in sorted(values.items(), key=lambda kv: str(kv[0])):
                family.add_metric(list(key) if isinstance(key, tuple) else [str(key)], value)
            return family

        buckets, running = [], 0
        for bound, count in zip((*self.LATENCY_BUCKETS, float("inf")), self._latency_counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        tcp = GaugeMetricFamily("sidecar_dns_tcp_connections", "Open DNS TCP connections.",
                                value=self.tcp_connections)
        return [
            counter("sidecar_dns_queries", "Queries answered, by qtype and rcode.", ["qtype", "rcode"],
                    self.query_totals()),
            counter("sidecar_dns_errors", "Error replies made here (formerr, notimp, refused, servfail...).",
                    ["reason"], dict(self.errors)),
            counter("sidecar_dns_dropped", "Messages dropped unanswered, by reason.", ["reason"], dict(self.dropped)),
            counter("sidecar_dns_forwarded", "Queries forwarded upstream, by outcome.", ["outcome"],
                    dict(self.forwarded)),
            counter("sidecar_dns_upstream_errors", "Failed upstream attempts, by upstream and reason.",
                    ["upstream", "reason"], dict(self.upstream_errors)),
            CounterMetricFamily("sidecar_dns_cache_hits", "Queries answered from the wire cache.",
                                value=self.cache_hit_total()),
            CounterMetricFamily("sidecar_dns_cache_misses", "In-zone queries answered by the general path.",
                                value=self.cache_misses),
            CounterMetricFamily("sidecar_dns_cache_invalidations", "Wire caches dropped for a new snapshot.",
                                value=self.cache_invalidations),
            CounterMetricFamily("sidecar_dns_forward_cache_hits", "Forwarded questions answered from the cache.",
                                value=self.forward_cache_hits),
            CounterMetricFamily("sidecar_dns_forward_cache_misses", "Forwarded questions sent upstream (cache on).",
                                value=self.forward_cache_misses),
            CounterMetricFamily("sidecar_dns_truncated", "Replies sent with TC set.", value=self.truncated),
            tcp,
            GaugeMetricFamily("sidecar_dns_udp_receive_buffer_bytes",
                              "SO_RCVBUF of the UDP listener as the kernel reports it.",
                              value=self.udp_receive_buffer),
            CounterMetricFamily("sidecar_dns_udp_receive_drops",
                                "Datagrams the kernel dropped for the UDP listener (receive buffer full).",
                                value=self.udp_receive_drops() or 0),
            HistogramMetricFamily(
                "sidecar_dns_query_duration_seconds",
                f"In-zone query processing time of queries whose ID is a multiple of {self.LATENCY_SAMPLE}.",
                buckets=buckets, sum_value=self._latency_sum),
        ]


class Buckets:
    """A histogram kept as plain counts: ``observe`` is a bisect and two additions; ``add_to``
    puts it into a Prometheus histogram family at scrape time."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        import bisect

        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def add_to(self, family: Any, labels: list[str]) -> None:
        """Add the histogram (cumulative buckets) to a ``HistogramMetricFamily`` as the series of ``labels``."""
        buckets, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        family.add_metric(labels, buckets, self.sum)


class CapabilityStats:
    """The proxy's per-request numbers of one ``capability`` label value: the value and its latencies."""

    __slots__ = ("capability", "durations")

    def __init__(self, capability: str, bounds: tuple[float, ...]) -> None:
        self.capability = capability
        self.durations = Buckets(bounds)


class ProxyMetrics:
    """Proxy metrics. Per-request ones are plain ints and dicts bumped on the request path
    and turned into families at scrape time (as ``DnsMetrics``); rare events use
    prometheus_client objects directly.

    The ``capability`` label is the in-zone capability a request was routed to, ``-`` when its
    target names none (a name, an id, passthrough, CONNECT, a bad request). At most
    ``MAX_CAPABILITIES`` capabilities get a value of their own, in the order they are first
    answered; requests to any later one (and to one nobody registered: ``unknown_target``) are
    counted under ``_other``, so the series stay bounded whatever gets registered or asked for.
    The request path finds a capability's ``CapabilityStats`` with one dict lookup.

    Breaker states are read at scrape time from ``breakers`` (the proxy sets it): the number of
    breakers in each state, and the state of each agent whose breaker is not closed (at most
    ``MAX_BREAKER_AGENTS`` of them, by agent id).
    """

    DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
    MAX_CAPABILITIES = 200
    NO_CAPABILITY = "-"
    OTHER_CAPABILITY = "_other"
    MAX_BREAKER_AGENTS = 100
    BREAKER_STATES = ("closed", "open", "half_open")

    def __init__(self, registry: CollectorRegistry) -> None:
        import collections

        # Read at scrape time by ``collect``.
        self.requests: collections.Counter[tuple[str, str, str]] = collections.Counter()  # (kind, capability, outcome)
        # By route capability ("" for none); the values are the label values' stats (see the class docstring).
        self.capabilities: dict[str, CapabilityStats] = {"": CapabilityStats(self.NO_CAPABILITY,
                                                                             self.DURATION_BUCKETS)}
        self._other = CapabilityStats(self.OTHER_CAPABILITY, self.DURATION_BUCKETS)
        self.attempts: collections.Counter[str] = collections.Counter()  # by outcome kind
        # A2A calls that name a task or context: owner found (hit), not known (miss), owner gone; cards served.
        self.a2a: collections.Counter[str] = collections.Counter()
        self.connections = 0
        self.upstream_connections = 0
        self.pool_reuses = 0
        self.tunnels = 0
        # (number of breakers, {agent id: state} of those not closed); set by the proxy.
        self.breakers: Callable[[], tuple[int, Mapping[str, str]]] = lambda: (0, {})
        self.retries = Counter(
            "sidecar_proxy_retries_total", "Requests sent again to another agent.", registry=registry)
        self.retry_budget_exhausted = Counter(
            "sidecar_proxy_retry_budget_exhausted_total", "Retries refused by the retry budget.", registry=registry)
        self.breaker_transitions = Counter(
            "sidecar_proxy_breaker_transitions_total", "Circuit breaker state changes, by new state.", ["state"],
            registry=registry)
        self.client_errors = Counter(
            "sidecar_proxy_client_errors_total", "Client connections closed on a protocol error or reset, by kind.",
            ["kind"], registry=registry)
        registry.register(self)  # type: ignore[arg-type]

    def of_capability(self, capability: str, new: bool = True) -> CapabilityStats:
        """The stats of requests routed to ``capability`` ("": none): its own, or ``_other``'s once
        ``MAX_CAPABILITIES`` have one (or, with ``new`` false, when it has none yet)."""
        found = self.capabilities.get(capability)
        if found is not None:
            return found
        if (not new or len(self.capabilities) > self.MAX_CAPABILITIES
                or capability in (self.NO_CAPABILITY, self.OTHER_CAPABILITY)):
            return self._other
        found = self.capabilities[capability] = CapabilityStats(capability, self.DURATION_BUCKETS)
        return found

    def observe_duration(self, seconds: float, capability: str = "") -> None:
        """Record one request's time from request head to response head sent."""
        self.of_capability(capability).durations.observe(seconds)

    def describe(self) -> list[object]:
        return list(self.collect())

    def collect(self) -> list[object]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        requests = CounterMetricFamily(
            "sidecar_proxy_requests", "Requests answered, by kind (capability, name, id, external, connect), "
            "capability (- for none, _other past the limit) and outcome (ok or an error code).",
            labels=["kind", "capability", "outcome"])
        for (kind, capability, outcome), count in sorted(self.requests.items()):
            requests.add_metric([kind, capability, outcome], count)
        durations = HistogramMetricFamily("sidecar_proxy_request_duration_seconds",
                                          "Time from request head to response head sent, by capability.",
                                          labels=["capability"])
        timed = [*self.capabilities.values(), *([self._other] if any(self._other.durations.counts) else [])]
        for stats in sorted(timed, key=lambda stats: stats.capability):
            stats.durations.add_to(durations, [stats.capability])
        attempts = CounterMetricFamily("sidecar_proxy_upstream_attempts", "Upstream attempts, by outcome kind.",
                                       labels=["outcome"])
        for outcome, count in sorted(self.attempts.items()):
            attempts.add_metric([outcome], count)
        a2a = CounterMetricFamily("sidecar_proxy_a2a", "A2A routing: calls naming a task or context (outcome hit, "
                                  "miss or owner_gone) and cards answered from the registry (card_served) or read "
                                  "from the agent (card_fetched).",
                                  labels=["outcome"])
        for outcome, count in sorted(self.a2a.items()):
            a2a.add_metric([outcome], count)
        return [
            a2a,
            requests,
            durations,
            attempts,
            GaugeMetricFamily("sidecar_proxy_client_connections", "Client connections open.",
                              value=self.connections),
            CounterMetricFamily("sidecar_proxy_upstream_connections", "Upstream connections opened.",
                                value=self.upstream_connections),
            CounterMetricFamily("sidecar_proxy_upstream_connection_reuses",
                                "Requests sent on a pooled upstream connection.", value=self.pool_reuses),
            GaugeMetricFamily("sidecar_proxy_tunnels", "CONNECT and Upgrade tunnels open.", value=self.tunnels),
            *self._breaker_families(),
        ]

    def _breaker_families(self) -> list[object]:
        from prometheus_client.core import GaugeMetricFamily

        total, tripped = self.breakers()  # ``tripped``: the agents whose breaker is open or half open
        counts = dict.fromkeys(self.BREAKER_STATES, 0)
        for state in tripped.values():
            counts[state] += 1
        counts["closed"] = total - len(tripped)
        breakers = GaugeMetricFamily("sidecar_proxy_breakers", "Circuit breakers held, by state.", labels=["state"])
        for state, count in counts.items():
            breakers.add_metric([state], count)
        per_agent = GaugeMetricFamily(
            "sidecar_proxy_breaker_state", f"Circuit breaker state of agents whose breaker is not closed (at most "
            f"{self.MAX_BREAKER_AGENTS}, by agent id): 1 open, 2 half_open.", labels=["agent"])
        for agent_id in sorted(tripped)[:self.MAX_BREAKER_AGENTS]:
            per_agent.add_metric([agent_id], 1 if tripped[agent_id] == "open" else 2)
        return [breakers, per_agent]


class HealthMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.checks = Counter(
            "sidecar_health_checks_total", "Active checks of the local agent, by type and outcome "
            "(pass, loaded = HTTP 429, fail).", ["type", "outcome"], registry=registry)
        self.check_seconds = Histogram(
            "sidecar_health_check_duration_seconds", "Time one active check took, by type.", ["type"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=registry)
        self.status = Gauge(
            "sidecar_health_agent_healthy", "1 while the local agent's published status is healthy.",
            registry=registry)
        self.status_changes = Counter(
            "sidecar_health_status_changes_total", "Changes of the local agent's published status, by new status.",
            ["status"], registry=registry)
        self.status_writes = Counter(
            "sidecar_health_status_writes_total", "Writes of the local agent's record to etcd, by outcome.",
            ["outcome"], registry=registry)
        self.flap_penalty = Gauge(
            "sidecar_health_flap_penalty_ratio", "Decayed flap-damping penalty of the local agent.",
            registry=registry)
        self.suppressed_recoveries = Counter(
            "sidecar_health_suppressed_recoveries_total", "Recoveries held back because the agent flaps.",
            registry=registry)
        self.card_errors = Counter(
            "sidecar_health_card_errors_total", "A2A agent cards that could not be read, by reason.", ["reason"],
            registry=registry)
        self.ejections = Counter(
            "sidecar_health_ejections_total", "Agents ejected by passive outlier detection.", registry=registry)
        self.ejections_refused = Counter(
            "sidecar_health_ejections_refused_total", "Ejections skipped because too many agents of a capability "
            "were already ejected.", registry=registry)
        self.ejected_agents = Gauge(
            "sidecar_health_ejected_agents", "Agents currently ejected by passive outlier detection.",
            registry=registry)


class ConfigMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.version = Gauge(
            "sidecar_config_version", "Version (etcd revision) of the dynamic configuration in force; 0: none.",
            registry=registry)
        self.applies = Counter(
            "sidecar_config_applies", "Dynamic configuration versions taken, by result (applied, rejected).",
            ["result"], registry=registry)
        self.needs_restart = Gauge(
            "sidecar_config_needs_restart", "Settings changed by the document that only take effect at a restart.",
            registry=registry)


class DiscoveryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.subscribers = Gauge(
            "sidecar_watch_subscribers", "Open watch subscriptions (SSE and gRPC).", registry=registry)
        self.lagged = Counter(
            "sidecar_watch_lagged", "Times a subscriber fell behind and was sent a fresh snapshot.",
            registry=registry)
        self.grpc_requests = Counter(
            "sidecar_grpc_requests", "gRPC calls by method and status code.", ["method", "code"],
            registry=registry)


class RuntimeMetrics:
    """The process itself: how late the event loop runs its callbacks."""

    LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

    def __init__(self, registry: CollectorRegistry) -> None:
        self.loop_lag = Histogram(
            "sidecar_event_loop_lag_seconds", "How late the event loop ran a periodic probe timer.",
            buckets=self.LAG_BUCKETS, registry=registry)


class Metrics:
    """All metric groups of one server, on one CollectorRegistry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.collector_registry = registry or CollectorRegistry()
        self.registry = RegistryMetrics(self.collector_registry)
        self.dns = DnsMetrics(self.collector_registry)
        self.proxy = ProxyMetrics(self.collector_registry)
        self.health = HealthMetrics(self.collector_registry)
        self.config = ConfigMetrics(self.collector_registry)
        self.discovery = DiscoveryMetrics(self.collector_registry)
        self.runtime = RuntimeMetrics(self.collector_registry)

    def exposition(self) -> bytes:
        """The Prometheus text format of every collector."""
        return generate_latest(self.collector_registry)
