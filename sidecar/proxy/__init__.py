"""The HTTP proxy: pure routing and policy (routing, balancers, affinity, breaker,
limits, retries, policy) behind a thin asyncio + httptools relay (relay, flight,
client, upstream, pool, tunnel, server).

The per-request modules may be compiled with mypyc at install (setup.py). A compiled
module takes precedence over its source, so in a checkout a source newer than its
compiled module (edited, or another branch checked out) is refused here rather than
silently ignored.
"""

from pathlib import Path


def _stale_compiled() -> list[str]:
    here = Path(__file__).parent
    if not any((parent / ".git").exists() for parent in here.parents):
        return []  # an installed copy: sources and compiled modules come from one build
    stale = []
    for compiled in here.rglob("*.so"):
        source = compiled.with_name(compiled.name.split(".", 1)[0] + ".py")
        if source.exists() and source.stat().st_mtime > compiled.stat().st_mtime + 1.0:
            stale.append(str(source.relative_to(here.parent.parent)))
    return stale


if _stale := _stale_compiled():
    raise ImportError(f"compiled proxy modules are older than their source ({', '.join(sorted(_stale))}): "
                      "run `pip install -e .` again, or delete sidecar/proxy/**/*.so to run the pure-Python modules")
