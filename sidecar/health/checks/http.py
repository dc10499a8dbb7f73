"""``http``: GET the URL; 2xx is healthy, 429 healthy but loaded, anything else unhealthy."""

from __future__ import annotations

import aiohttp

from ...model import parse_load
from . import Result

LOADED = 429


class Http:
    def __init__(self, url: str, timeout: float) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"http check needs an http:// or https:// URL, got {url!r}")
        self.url = url
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def check(self) -> Result:
        if self._session is None:
            # No pooling: every probe opens a connection, as a peer's first request would.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            async with self._session.get(self.url, allow_redirects=False) as response:
                await response.read()
                status = response.status
                reported = response.headers.get("x-agent-load")
        except TimeoutError:
            return Result(False, detail=f"no answer within {self.timeout:g}s")
        except aiohttp.ClientError as exc:
            return Result(False, detail=f"{type(exc).__name__}: {exc}")
        load = parse_load(reported) if reported is not None else None
        if 200 <= status < 300:
            return Result(True, detail=f"HTTP {status}", load=load)
        if status == LOADED:
            return Result(True, loaded=True, detail="HTTP 429", load=load)
        return Result(False, detail=f"HTTP {status}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
