"""Kernel isolation for the chaos scenarios: a network-namespace pair joined by a veth, a memory cgroup.

Both are created under names chosen here and removed by those names; neither
touches any other namespace or cgroup. Each says why it is unavailable instead
of failing half-built.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence

# A private /30 between the two namespaces only: .1 is the etcd side, .2 the sidecar side.
ETCD_SIDE, SIDECAR_SIDE = "10.213.77.1", "10.213.77.2"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class NetnsPair:
    """Namespaces ``etcd`` and ``sidecar``, a veth between them; ``cut()``/``heal()`` take its sidecar end down/up."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.etcd, self.sidecar = f"chaos-e-{tag}", f"chaos-s-{tag}"
        self._veth_etcd, self._veth_sidecar = f"chE{tag}", f"chS{tag}"
        self._created: list[str] = []

    @staticmethod
    def unavailable() -> str:
        """Why namespaces cannot be used here ('' when they can)."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        missing = [tool for tool in ("ip", "curl", "dig") if shutil.which(tool) is None]
        if missing:
            return f"not installed: {', '.join(missing)} (iproute2, curl, dnsutils)"
        probe = f"chaos-probe-{uuid.uuid4().hex[:6]}"
        try:
            _ip("netns", "add", probe)
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            return f"`ip netns add` is not permitted here: {exc} {detail.decode(errors='replace').strip()}"
        _ip("netns", "del", probe)
        return ""

    def create(self) -> NetnsPair:
        for name in (self.etcd, self.sidecar):
            _ip("netns", "add", name)
            self._created.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", self.etcd, "link", "add", self._veth_etcd, "type", "veth", "peer", "name", self._veth_sidecar,
            "netns", self.sidecar)
        _ip("-n", self.etcd, "addr", "add", f"{ETCD_SIDE}/30", "dev", self._veth_etcd)
        _ip("-n", self.sidecar, "addr", "add", f"{SIDECAR_SIDE}/30", "dev", self._veth_sidecar)
        _ip("-n", self.etcd, "link", "set", self._veth_etcd, "up")
        self.heal()
        return self

    def exec(self, namespace: str) -> list[str]:
        """The command prefix that runs a program inside ``namespace``."""
        return ["ip", "netns", "exec", namespace]

    def cut(self) -> None:
        _ip("-n", self.sidecar, "link", "set", self._veth_sidecar, "down")

    def heal(self) -> None:
        _ip("-n", self.sidecar, "link", "set", self._veth_sidecar, "up")

    def cleanup(self) -> None:
        # Deleting a namespace deletes the veth end inside it, and so the pair.
        for name in reversed(self._created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        self._created.clear()


class MemoryCgroup:
    """A memory-limited cgroup (v2 when the unified hierarchy has the memory controller, else v1)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        name = f"chaos-{uuid.uuid4().hex[:8]}"
        unified = "/sys/fs/cgroup"
        if "memory" in _read(os.path.join(unified, "cgroup.controllers")).split():
            self.version, self.path = 2, os.path.join(unified, name)
        else:
            self.version, self.path = 1, os.path.join(unified, "memory", name)

    @staticmethod
    def unavailable() -> str:
        """Why no memory cgroup can be made (or taskset run) here ('' when both can)."""
        unified = "/sys/fs/cgroup"
        if "memory" in _read(os.path.join(unified, "cgroup.controllers")).split():
            parent = unified
        elif os.path.isdir(os.path.join(unified, "memory")):
            parent = os.path.join(unified, "memory")
        else:
            return "no cgroup memory controller is mounted (neither v2 nor v1)"
        if shutil.which("taskset") is None:
            return "taskset (util-linux) is not installed"
        if not os.access(parent, os.W_OK):
            return f"{parent} is not writable (a container without cgroup delegation)"
        return ""

    def create(self) -> MemoryCgroup:
        os.mkdir(self.path)
        limit_file = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        with open(os.path.join(self.path, limit_file), "w") as handle:
            handle.write(str(self.limit))
        return self

    def wrap(self) -> Sequence[str]:
        """A command prefix that joins this cgroup, then runs the rest (the PID stays the program's)."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', os.path.join(self.path, "cgroup.procs")]

    def oom_kills(self) -> int:
        if self.version == 2:
            text = _read(os.path.join(self.path, "memory.events"))
        else:
            text = _read(os.path.join(self.path, "memory.oom_control"))
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def peak(self) -> int:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        value = _read(os.path.join(self.path, name)).strip()
        return int(value) if value.isdigit() else 0

    def cleanup(self) -> None:
        try:
            os.rmdir(self.path)
        except OSError:
            pass


def _read(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (0 once it is gone)."""
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
