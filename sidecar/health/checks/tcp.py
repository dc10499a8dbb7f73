"""``tcp``: the agent accepts a connection within the timeout."""

from __future__ import annotations

import asyncio

from . import Result, host_port


class Tcp:
    def __init__(self, url: str, timeout: float) -> None:
        self.host, self.port, _ = host_port(url)
        self.timeout = timeout

    async def check(self) -> Result:
        try:
            async with asyncio.timeout(self.timeout):
                _, writer = await asyncio.open_connection(self.host, self.port)
        except TimeoutError:
            return Result(False, detail=f"no connection within {self.timeout:g}s")
        except OSError as exc:
            return Result(False, detail=exc.strerror or str(exc))
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return Result(True, detail="connected")

    async def close(self) -> None:
        pass
