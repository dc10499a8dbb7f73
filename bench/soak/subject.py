"""`sidecar run` as the soak's subject, plus a sampler of its asyncio task count.

    python bench/soak/subject.py TASKS_FILE <sidecar run arguments>

Runs exactly `sidecar run` (uvloop, the default) and, every 2 s, appends
``<unix time> <number of asyncio tasks>`` to TASKS_FILE; the count is taken
in the loop's own thread (call_soon_threadsafe), not read across threads.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import uvloop

from sidecar.cli import main


def sample(loops: list[asyncio.AbstractEventLoop], path: str) -> None:
    def count() -> None:
        with open(path, "a") as out:
            out.write(f"{time.time():.1f} {len(asyncio.all_tasks())}\n")

    while True:
        time.sleep(2.0)
        if loops and not loops[-1].is_closed():
            loops[-1].call_soon_threadsafe(count)


if __name__ == "__main__":
    loops: list[asyncio.AbstractEventLoop] = []
    make = uvloop.new_event_loop

    def recording_loop() -> asyncio.AbstractEventLoop:
        loops.append(make())
        return loops[-1]

    uvloop.new_event_loop = recording_loop  # type: ignore[assignment]
    threading.Thread(target=sample, args=(loops, sys.argv[1]), daemon=True).start()
    main(["run", *sys.argv[2:]])
