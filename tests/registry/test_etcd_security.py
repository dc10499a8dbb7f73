"""TLS (with client certificates) and username/password auth against a real etcd started that way."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.config import EtcdSettings, build
from sidecar.errors import RegistryUnavailable
from sidecar.registry.etcd import EtcdClient

from ..etcd_process import free_port

pytestmark = [pytest.mark.etcd]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(where: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=where)
    (where / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", cwd=where)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "1", "-out", f"{name}.pem", "-extfile", "san.cnf", cwd=where)


@pytest.fixture
def secure_etcd(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    make_pki(tmp_path)
    port, peer = free_port(), free_port()
    endpoint = f"https://127.0.0.1:{port}"
    process = subprocess.Popen(
        ["etcd", "--name", "tls", "--data-dir", str(tmp_path / "data"),
         "--listen-client-urls", endpoint, "--advertise-client-urls", endpoint,
         "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"tls=http://127.0.0.1:{peer}",
         "--cert-file", str(tmp_path / "server.pem"), "--key-file", str(tmp_path / "server.key"),
         "--client-cert-auth", "--trusted-ca-file", str(tmp_path / "ca.pem"), "--log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ctl = ["etcdctl", "--endpoints", endpoint, "--cacert", str(tmp_path / "ca.pem"),
           "--cert", str(tmp_path / "client.pem"), "--key", str(tmp_path / "client.key")]
    env = {**os.environ, "ETCDCTL_API": "3"}
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([*ctl, "endpoint", "health"], env=env, capture_output=True).returncode != 0:
            assert process.poll() is None and time.monotonic() < deadline, "TLS etcd did not start"
            time.sleep(0.1)
        for command in (["user", "add", "root", "--new-user-password", "s3cret"], ["auth", "enable"]):
            subprocess.run([*ctl, *command], env=env, check=True, capture_output=True, timeout=30)
        yield endpoint, tmp_path
    finally:
        process.kill()
        process.wait()


def settings(endpoint: str, pki: Path, **overrides: str) -> EtcdSettings:
    base = {"endpoints": [endpoint], "request_timeout": 3, "ca_file": str(pki / "ca.pem"),
            "cert_file": str(pki / "client.pem"), "key_file": str(pki / "client.key"),
            "username": "root", "password": "s3cret"}
    return build(EtcdSettings, {**base, **overrides}, "etcd.")


@pytest.mark.asyncio
async def test_tls_with_a_client_certificate_and_auth(secure_etcd: tuple[str, Path]) -> None:
    endpoint, pki = secure_etcd
    client = EtcdClient.from_settings(settings(endpoint, pki))
    try:
        revision = await client.put("/secure/k", b"v")
        stored = await client.get_at("/secure/k")
        assert stored is not None and stored.value == b"v" and stored.mod_revision == revision
        lease = await client.grant(5)
        assert await client.refresh(lease) > 0
        stream = await client.watch_prefix("/secure/", revision + 1)
        await client.put("/secure/k2", b"w")
        batch = await anext(stream)
        assert [e.key for e in batch] == ["/secure/k2"]
        await stream.close()
    finally:
        await client.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("overrides", [{"password": "wrong"}, {"cert_file": "", "key_file": ""}],
                         ids=["wrong password", "no client certificate"])
async def test_refused_credentials_are_a_clear_error(secure_etcd: tuple[str, Path], overrides: dict) -> None:
    endpoint, pki = secure_etcd
    client = EtcdClient.from_settings(settings(endpoint, pki, **overrides))
    try:
        with pytest.raises(RegistryUnavailable):
            await client.get_at("/secure/k")
    finally:
        await client.close()
