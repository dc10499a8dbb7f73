"""The HTTP proxy: pure routing and policy (routing, balancers, affinity, breaker,
limits, retries) behind a thin asyncio + httptools relay (http1, server)."""
