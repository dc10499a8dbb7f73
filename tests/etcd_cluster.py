"""A real 3-member (or n-member) etcd cluster on loopback for the tests: members are children, killed by PID."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request

from sidecar.dev import stable_port


class Member:
    """One member: its ports, data dir and process."""

    def __init__(self, name: str, base: str) -> None:
        self.name = name
        self.client_port = stable_port()
        self.peer_port = stable_port()
        self.endpoint = f"http://127.0.0.1:{self.client_port}"
        self.peer_url = f"http://127.0.0.1:{self.peer_port}"
        self.dir = os.path.join(base, name)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, initial_cluster: str, state: str = "new") -> None:
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, "etcd.log"), "ab") as log:
            self.process = subprocess.Popen(
                ["etcd", "--name", self.name, "--data-dir", os.path.join(self.dir, "data"),
                 "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
                 "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
                 "--initial-cluster", initial_cluster, "--initial-cluster-state", state,
                 "--initial-cluster-token", os.path.basename(os.path.dirname(self.dir)),
                 "--heartbeat-interval", "100", "--election-timeout", "1000",
                 "--log-level", "warn", "--logger", "zap"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait()
            self.process = None

    def status(self) -> dict | None:
        """This member's view (leader id, raft term) or None when it does not answer."""
        try:
            request = urllib.request.Request(f"{self.endpoint}/v3/maintenance/status", data=b"{}", method="POST")
            with urllib.request.urlopen(request, timeout=1) as response:
                return json.loads(response.read())
        except OSError:
            return None


class EtcdCluster:
    """``n`` members on free loopback ports, data on tmpfs when there is one."""

    def __init__(self, size: int = 3) -> None:
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.dir = tempfile.mkdtemp(prefix="etcd-cluster-", dir=base)
        self.members = [Member(f"m{i}", self.dir) for i in range(size)]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def initial_cluster(self, members: list[Member] | None = None) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in (members or self.members))

    def start(self, timeout: float = 30) -> None:
        for member in self.members:
            member.start(self.initial_cluster())
        self.wait_for_leader(timeout)

    def leader(self) -> Member | None:
        """The member the running members agree is leader."""
        ids = {}
        for member in self.members:
            if member.running:
                status = member.status()
                if status and "header" in status:
                    ids[int(status["header"]["member_id"])] = member
                    leader = int(status.get("leader", 0))
                    if leader and leader in ids:
                        return ids[leader]
        for member in self.members:
            status = member.status() if member.running else None
            if status and int(status.get("leader", 0)) in ids:
                return ids[int(status["leader"])]
        return None

    def wait_for_leader(self, timeout: float = 30) -> Member:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.leader()
            if leader is not None:
                return leader
            time.sleep(0.05)
        raise AssertionError(f"no etcd leader within {timeout:g}s; logs in {self.dir}")

    def ctl(self, *args: str, endpoints: list[str] | None = None) -> str:
        env = {**os.environ, "ETCDCTL_API": "3"}
        running = endpoints or [m.endpoint for m in self.members if m.running]
        result = subprocess.run(["etcdctl", "--endpoints", ",".join(running), *args], env=env,
                                capture_output=True, check=True, timeout=30)
        return result.stdout.decode()

    def cleanup(self) -> None:
        for member in self.members:
            member.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
