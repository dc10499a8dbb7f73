"""A TCP relay in front of etcd that can freeze (keep connections open, forward nothing) or delay answers.

It stands for one etcd member the client reaches on its own port: frozen, it is a
member under SIGSTOP (its connections still look READY to gRPC); with ``delay``,
a member that answers, slowly (a large range read on a loaded machine).
"""

from __future__ import annotations

import asyncio
import contextlib


class Relay:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.target_port = target_port
        self.port = 0
        self.frozen = False
        self.delay = 0.0
        self.connections = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._thawed = asyncio.Event()
        self._thawed.set()
        self._closed = False

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def freeze(self) -> None:
        self.frozen = True
        self._thawed.clear()

    def thaw(self) -> None:
        self.frozen = False
        self._thawed.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)  # before any await: close() aborts it whatever happens next
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.append(up_writer)
        if self._closed:  # closed while this connection was being set up: nothing may be left open
            writer.transport.abort()
            up_writer.transport.abort()
            return
        for task in (self._pipe(reader, up_writer, 0.0), self._pipe(up_reader, writer, None)):
            running = asyncio.get_running_loop().create_task(task)
            self._tasks.add(running)
            running.add_done_callback(self._tasks.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float | None) -> None:
        # Chunks are read at once and written ``delay`` after they arrived (not delay per chunk).
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def send() -> None:
            while True:
                arrived, data = await queue.get()
                await self._thawed.wait()
                pause = self.delay if delay is None else delay
                await asyncio.sleep(max(0.0, arrived + pause - loop.time()))
                writer.write(data)
                await writer.drain()

        sender = loop.create_task(send())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((loop.time(), data))
        except (ConnectionError, OSError):
            pass
        finally:
            sender.cancel()
            writer.close()

    async def close(self) -> None:
        self._closed = True
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
