"""The command line, as a user runs it: real processes, a real etcd."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import aiohttp
import pytest

from sidecar.cli import parser, settings_from
from sidecar.config import EtcdSettings, build
from sidecar.registry.etcd import EtcdClient

from .etcd_process import EtcdProcess, free_port
from .waiting import eventually


def sidecar(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_precedence_flag_over_env_over_file(tmp_path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text("service_discovery:\n  dns: {listen: '127.0.0.1:1111', domain: file.local}\n"
                      "  proxy: {listen: '127.0.0.1:2222'}\n  load_balancer: {algorithm: round_robin}\n")
    args = parser().parse_args(["run", "--config", str(config), "--dns-listen", "127.0.0.1:3333",
                                "--agent-capability", "a", "--agent-capability", "b", "--agent-meta", "k=v"])
    env = {"SIDECAR_DNS_LISTEN": "127.0.0.1:4444", "SIDECAR_PROXY_LISTEN": "127.0.0.1:5555",
           "ETCD_ENDPOINTS": "http://10.0.0.1:2379,http://10.0.0.2:2379"}
    settings = settings_from(args, env)
    assert settings.dns.listen == "127.0.0.1:3333"        # flag
    assert settings.proxy.listen == "127.0.0.1:5555"      # env over file
    assert settings.dns.domain == "file.local"            # file over default
    assert settings.load_balancer.algorithm == "round_robin"
    assert settings.admin.listen == "127.0.0.1:15000"     # default
    assert settings.etcd.endpoints == ("http://10.0.0.1:2379", "http://10.0.0.2:2379")
    assert settings.agent.capabilities == ("a", "b") and settings.agent.metadata == {"k": "v"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dns-listen", "nowhere"], "dns.listen: must be HOST:PORT"),
        (["--dns-a-mode", "sideways"], "dns.a_mode: must be one of direct, proxy"),
        (["--etcd-endpoints", "ftp://x"], "etcd.endpoints: must be http://host:port or https://host:port"),
        (["--agent-port", "99999"], "agent.port: must be at most 65535"),
        (["--domain", "bad domain!"], "dns.domain: must be a DNS name"),
        (["--prefix", "noslash/"], "etcd.prefix: must be empty or [/]name"),
    ],
)
def test_invalid_flags_exit_2_naming_key_and_value(args: list[str], message: str) -> None:
    result = sidecar("run", *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_invalid_files_exit_2(tmp_path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("service_discovery: [\n")
    result = sidecar("run", "--config", str(broken))
    assert result.returncode == 2 and "not valid YAML at line 2" in result.stderr
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("service_discovery:\n  load_balancer: {algoritm: round_robin}\n")
    result = sidecar("run", "--config", str(unknown))
    assert result.returncode == 2 and "load_balancer.algoritm: unknown key" in result.stderr
    result = sidecar("run", "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "cannot read" in result.stderr


@pytest.mark.etcd
def test_register_then_agents_then_interrupt(etcd: EtcdProcess, prefix: str) -> None:
    env = {"ETCD_ENDPOINTS": etcd.endpoint, "SIDECAR_PREFIX": prefix}
    with subprocess.Popen(
        [sys.executable, "-m", "sidecar", "register", "--name", "coder", "--id", "coder-1", "--address",
         "127.0.0.1", "--port", "9000", "--capability", "code", "--tag", "py", "--meta", "team=ml", "--ttl", "5s"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env}) as process:
        _register_then_agents(process, env, prefix)


def _register_then_agents(process: subprocess.Popen, env: dict[str, str], prefix: str) -> None:
    try:
        assert process.stdout is not None and process.stderr is not None
        line = process.stdout.readline()
        assert line.startswith(f"registered {prefix}/services/coder/coder-1"), line + process.stderr.read()
        table = sidecar("agents", "--capability", "code", env=env)
        assert table.returncode == 0
        header, row = table.stdout.splitlines()
        assert header.split()[:5] == ["ID", "NAME", "ADDRESS", "PORT", "HEALTH"]
        assert row.split()[:5] == ["coder-1", "coder", "127.0.0.1", "9000", "healthy"]
        document = json.loads(sidecar("agents", "--json", "--tag", "py", env=env).stdout)
        assert [a["metadata"] for a in document["agents"]] == [{"team": "ml"}] and document["revision"] > 0
        assert sidecar("agents", "--tag", "nope", env=env).stdout.splitlines()[1:] == []
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0
        assert json.loads(sidecar("agents", "--json", env=env).stdout)["agents"] == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_register_rejects_bad_agents() -> None:
    result = sidecar("register", "--name", "x", "--address", "not valid", "--port", "80", "--ttl", "1s",
                     "--etcd-endpoints", "http://127.0.0.1:1")
    assert result.returncode == 2
    assert "address:" in result.stderr and "ttl:" in result.stderr


def test_agents_says_when_etcd_is_unreachable() -> None:
    result = sidecar("agents", "--etcd-endpoints", f"http://127.0.0.1:{free_port()}", timeout=60)
    assert result.returncode == 1 and "etcd unavailable" in result.stderr


@pytest.mark.etcd
def test_run_serves_and_stops_cleanly_on_sigterm(etcd: EtcdProcess, prefix: str) -> None:
    admin = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run", "--etcd-endpoints", etcd.endpoint, "--prefix", prefix,
         "--admin-listen", f"127.0.0.1:{admin}", "--dns-listen", f"127.0.0.1:{free_port()}",
         "--proxy-listen", f"127.0.0.1:{free_port()}", "--grpc-listen", f"127.0.0.1:{free_port()}",
         "--upstream-dns", "none"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_closed_pipe_ends_quietly(tmp_path) -> None:
    """``sidecar ... | head``: the reader goes away early; exit 0, no traceback."""
    pods = "".join(f"---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}}}\nspec:\n  containers: [{{name: a, "
                   f"image: x}}]\n" for i in range(400))
    source = tmp_path / "pods.yaml"
    source.write_text(pods)
    process = subprocess.Popen([sys.executable, "-m", "sidecar", "inject", "--upstream-dns", "10.96.0.10",
                                str(source)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.read(200)
    process.stdout.close()  # as head does after its lines
    err = process.stderr.read()
    process.stderr.close()
    assert process.wait(60) == 0 and b"Traceback" not in err and b"BrokenPipe" not in err, err[-2000:]


async def _write_agents(endpoint: str, prefix: str, count: int, capability: str = "bulk") -> None:
    """Write ``count`` agent records straight to etcd (no lease: the test's prefix isolates them)."""
    client = EtcdClient.from_settings(build(EtcdSettings, {"endpoints": [endpoint], "prefix": prefix}, "etcd."))
    try:
        for i in range(count):
            agent = {"id": f"bulk-{i}", "name": "bulk", "address": "127.0.0.1", "port": 8000 + i % 1000,
                     "capabilities": [capability], "tags": ["t"], "health": {"status": "healthy"}}
            await client.put(f"{prefix}/services/bulk/bulk-{i}", json.dumps(agent).encode())
    finally:
        await client.close()


def _put_agents(endpoint: str, prefix: str, count: int, capability: str = "bulk") -> None:
    asyncio.run(_write_agents(endpoint, prefix, count, capability))


@pytest.mark.etcd
@pytest.mark.parametrize("form", [["--json"], []], ids=["json", "table"])
def test_agents_into_a_closed_pipe_ends_quietly(etcd: EtcdProcess, prefix: str, form: list[str]) -> None:
    """``sidecar agents [--json] | head -1`` with more output than a pipe holds: exit 0, nothing on stderr."""
    _put_agents(etcd.endpoint, prefix, 600)
    process = subprocess.Popen([sys.executable, "-m", "sidecar", "agents", *form, "--etcd-endpoints", etcd.endpoint,
                                "--prefix", prefix], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.readline()
    process.stdout.close()  # as head does after its line
    err = process.stderr.read()
    process.stderr.close()
    assert process.wait(60) == 0, err[-2000:]
    assert b"Broken pipe" not in err and b"Traceback" not in err, err[-2000:]


@pytest.mark.etcd
@pytest.mark.asyncio
async def test_agents_json_is_the_document_of_get_v1_agents(make_server, etcd: EtcdProcess, prefix: str) -> None:
    """``--admin URL`` prints that sidecar's ``GET /v1/agents`` exactly; from etcd the same document, with
    the sidecar-only fields as a reader of etcd alone has them (owned false, breaker null, pending [])."""
    server = await make_server()
    assert server.admin.address is not None
    admin = "http://{}:{}".format(*server.admin.address[:2])
    await _write_agents(etcd.endpoint, prefix, 2, capability="chat")  # not this sidecar's
    async with aiohttp.ClientSession() as http:
        async with http.post(admin + "/v1/agents", json={"id": "mine", "name": "mine", "address": "127.0.0.1",
                                                         "port": 9100, "capabilities": ["chat"], "ttl": "30s"}) as r:
            assert r.status == 201, await r.text()
        await eventually(lambda: len(server.catalog.snapshot.agents) == 3, what="three agents in the snapshot")

        async def rest() -> dict:
            async with http.get(admin + "/v1/agents", params={"capability": "chat"}) as response:
                assert response.status == 200
                return dict(await response.json())

        def cli(*args: str) -> dict:
            result = sidecar("agents", "--json", "--capability", "chat", *args)
            assert result.returncode == 0, result.stderr
            return dict(json.loads(result.stdout))

        before = await rest()
        asked = await asyncio.to_thread(cli, "--admin", admin)
        assert asked == before == await rest()
        read = await asyncio.to_thread(cli, "--etcd-endpoints", etcd.endpoint, "--prefix", prefix)
    assert list(read) == list(before) == ["revision", "agents", "pending"]
    assert read["revision"] >= before["revision"] and read["pending"] == before["pending"] == []
    assert [list(agent) for agent in read["agents"]] == [list(agent) for agent in before["agents"]]
    assert {a["id"]: (a["owned"], a["breaker"]) for a in before["agents"]} == {
        "bulk-0": (False, "closed"), "bulk-1": (False, "closed"), "mine": (True, "closed")}
    assert all(a["owned"] is False and a["breaker"] is None for a in read["agents"])
    sidecar_only = ("owned", "breaker")
    assert [{k: v for k, v in a.items() if k not in sidecar_only} for a in read["agents"]] == [
        {k: v for k, v in a.items() if k not in sidecar_only} for a in before["agents"]]


def test_agents_says_when_the_admin_api_is_unreachable() -> None:
    result = sidecar("agents", "--admin", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1 and "sidecar: admin API http://127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.etcd
def test_agents_and_register_read_etcd_from_the_config_file(etcd: EtcdProcess, prefix: str, tmp_path) -> None:
    """``--config FILE``: its etcd endpoints and prefix, for ``register`` and ``agents``; a flag still wins."""
    config = tmp_path / "sidecar.yaml"
    config.write_text(f"service_discovery:\n  etcd: {{endpoints: ['{etcd.endpoint}'], prefix: '{prefix}'}}\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("ETCD_ENDPOINTS", "SIDECAR_PREFIX", "SIDECAR_CONFIG", "SIDECAR_ETCD_ENDPOINTS")}
    with subprocess.Popen(
        [sys.executable, "-m", "sidecar", "register", "--config", str(config), "--name", "filed", "--id", "filed-1",
         "--address", "127.0.0.1", "--port", "9000", "--capability", "files", "--ttl", "5s"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as process:
        try:
            assert process.stdout is not None and process.stderr is not None
            line = process.stdout.readline()
            assert line.startswith(f"registered {prefix}/services/filed/filed-1"), line + process.stderr.read()

            def agents(*args: str) -> subprocess.CompletedProcess:
                return subprocess.run([sys.executable, "-m", "sidecar", "agents", "--json", *args],
                                      capture_output=True, text=True, timeout=30, env=env)

            found = agents("--config", str(config))
            assert found.returncode == 0, found.stderr
            assert [a["key"] for a in json.loads(found.stdout)["agents"]] == [f"{prefix}/services/filed/filed-1"]
            other = agents("--config", str(config), "--prefix", prefix + "-other")
            assert other.returncode == 0 and json.loads(other.stdout)["agents"] == []
            process.send_signal(signal.SIGINT)
            assert process.wait(20) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
