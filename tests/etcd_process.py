"""A real etcd member for the tests, with the controls tests need (freeze, etcdctl)."""

from __future__ import annotations

import os
import signal
import subprocess

from sidecar.dev import EmbeddedEtcd, free_port

__all__ = ["EtcdProcess", "free_port"]


class EtcdProcess(EmbeddedEtcd):
    """The embedded dev etcd plus kill, SIGSTOP/SIGCONT and etcdctl."""

    def __init__(self) -> None:
        super().__init__(name="test")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def ctl(self, *args: str) -> str:
        """Run etcdctl against this member; returns stdout."""
        env = {**os.environ, "ETCDCTL_API": "3"}
        result = subprocess.run(["etcdctl", "--endpoints", self.endpoint, *args], env=env,
                                capture_output=True, check=True, timeout=30)
        return result.stdout.decode()
