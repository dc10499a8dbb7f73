"""Dynamic configuration end to end: two sidecars on a real etcd, the admin API, the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import aiohttp
import dns.asyncquery
import dns.message
import pytest

from sidecar.dynamic import config_key
from sidecar.server import Server

from .etcd_process import EtcdProcess, free_port
from .sse import next_event
from .waiting import eventually

pytestmark = [pytest.mark.etcd]

AGENT = {"id": "chat-1", "name": "chat-agent", "address": "127.0.0.1", "port": 9001, "capabilities": ["chat"],
         "ttl": "10s"}


def base(server: Server) -> str:
    assert server.admin.address is not None
    return "http://{}:{}".format(*server.admin.address)


async def put_config(http: aiohttp.ClientSession, server: Server, document: object, **headers: str) -> tuple[int, dict]:
    async with http.put(base(server) + "/v1/config", json=document, headers=headers) as response:
        return response.status, await response.json()


async def get_config(http: aiohttp.ClientSession, server: Server) -> dict:
    async with http.get(base(server) + "/v1/config") as response:
        assert response.status == 200
        return await response.json()


async def dns_ttl(server: Server, name: str) -> int:
    reply = await dns.asyncquery.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=server.dns.port, timeout=5)
    return reply.answer[0].ttl


def cli(*args: str, etcd: EtcdProcess, prefix: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=60,
                          input=stdin, env={**os.environ, "ETCD_ENDPOINTS": etcd.endpoint, "SIDECAR_PREFIX": prefix})


@pytest.mark.asyncio
async def test_one_change_reaches_every_sidecar_and_rollback_undoes_it(make_server, etcd, prefix) -> None:
    first, second = await make_server(), await make_server()
    async with aiohttp.ClientSession() as http:
        async with http.post(base(first) + "/v1/agents", json=AGENT) as response:
            assert response.status == 201
        await eventually(lambda: "chat-1" in second.catalog.snapshot.by_id)
        assert await dns_ttl(second, "chat.agents.local") == 5
        document = {"load_balancer": {"algorithm": "round_robin", "circuit_breaker": {"failure_threshold": 2}},
                    "dns": {"ttl": 30}}
        status, body = await put_config(http, first, document)
        assert status == 200, body
        version = body["version"]
        await eventually(lambda: second.config.version == version, what="the second sidecar to apply it")
        assert second.settings.load_balancer.algorithm == "round_robin"
        assert second.proxy.policy.balancing.circuit_breaker.failure_threshold == 2
        assert await dns_ttl(second, "chat.agents.local") == 30
        shown = await get_config(http, second)
        assert shown["version"] == version and shown["document"] == document and shown["error"] is None
        assert shown["effective"]["dns"]["ttl"] == 30 and shown["needs_restart"] == []
        async with http.get(base(second) + "/metrics") as response:
            assert f"sidecar_config_version {float(version)}" in await response.text()

        status, body = await put_config(http, second, {"dns": {"ttl": 60}}, **{"If-Match": f'"{version}"'})
        assert status == 200, body
        await eventually(lambda: first.settings.dns.ttl == 60)
        assert first.settings.load_balancer.algorithm == "weighted_random", "keys the new version leaves out revert"
        async with http.get(base(first) + "/v1/config/history") as response:
            versions = (await response.json())["versions"]
        assert [v["version"] for v in versions] == [body["version"], version]
        assert versions[1]["document"] == document and versions[1]["valid"]

        rolled = cli("config", "rollback", str(version), etcd=etcd, prefix=prefix)
        assert rolled.returncode == 0, rolled.stderr
        assert f"rolled back to version {version}" in rolled.stdout
        await eventually(lambda: second.settings.dns.ttl == 30 and first.settings.dns.ttl == 30)
        assert first.settings.load_balancer.algorithm == "round_robin"
        assert await dns_ttl(first, "chat.agents.local") == 30


@pytest.mark.asyncio
async def test_an_invalid_document_is_rejected_and_the_last_good_one_stays(make_server, etcd, prefix) -> None:
    server = await make_server()
    async with aiohttp.ClientSession() as http:
        status, body = await put_config(http, server, {"dns": {"ttl": -5}})
        assert status == 400 and body["code"] == "invalid_config" and body["key"] == "dns.ttl" and body["value"] == -5
        status, body = await put_config(http, server, {"proxy": {"listen": "127.0.0.1:1"}, "agent": {"name": "x"}})
        assert status == 400 and body["key"] == "agent"
        injected = "a;b=c\r\nX-Injected: y"
        status, body = await put_config(http, server, {"sticky": {"cookie": injected}})
        assert status == 400 and body["key"] == "sticky.cookie" and body["value"] == injected, "no header injection"
        status, body = await put_config(http, server, {"sticky": {"enabled": False}})
        assert status == 200
        good = body["version"]
        await eventually(lambda: server.config.version == good)
        assert not server.proxy.policy.affinity.settings.enabled
        # Written past the validation (another tool, an old version of this one): refused by every sidecar.
        key = f"{prefix}/config/sidecar"
        etcd.ctl("put", key, json.dumps({"sticky": {"enabled": False}, "load_balancer": {"algorithm": "fastest"}}))
        await eventually(lambda: server.config.error is not None, what="the rejection")
        shown = await get_config(http, server)
        assert shown["version"] == good and shown["error"]["key"] == "load_balancer.algorithm"
        assert shown["error"]["value"] == "fastest" and shown["error"]["version"] > good
        etcd.ctl("put", key, "{not json")
        await eventually(lambda: "not valid JSON" in (server.config.error or {}).get("reason", ""))
        assert server.config.version == good and not server.settings.sticky.enabled, "the last good one stays"
        async with http.get(base(server) + "/metrics") as response:
            text = await response.text()
        assert 'sidecar_config_applies_total{result="rejected"} 2.0' in text


@pytest.mark.asyncio
async def test_writers_cannot_overwrite_each_other_silently(make_server, etcd, prefix) -> None:
    server = await make_server()
    async with aiohttp.ClientSession() as http:
        status, body = await put_config(http, server, {"dns": {"ttl": 7}}, **{"If-Match": "0"})
        assert status == 200
        read = body["version"]
        status, body = await put_config(http, server, {"dns": {"ttl": 8}}, **{"If-Match": str(read)})
        assert status == 200
        status, body = await put_config(http, server, {"dns": {"ttl": 9}}, **{"If-Match": str(read)})
        assert status == 409 and body["code"] == "config_conflict" and body["version"] > read
    lost = cli("config", "set", "-", "--expect-version", str(read), etcd=etcd, prefix=prefix, stdin="dns: {ttl: 10}\n")
    assert lost.returncode == 1 and "conflict" in lost.stderr and f"since version {read}" in lost.stderr
    won = cli("config", "set", "-", etcd=etcd, prefix=prefix, stdin="dns: {ttl: 11}\n")
    assert won.returncode == 0, won.stderr
    shown = cli("config", "show", etcd=etcd, prefix=prefix)
    assert json.loads(shown.stdout)["document"] == {"dns": {"ttl": 11}}
    bad = cli("config", "validate", "-", etcd=etcd, prefix=prefix, stdin="dns: {ttl: [}\n")
    assert bad.returncode == 2 and "not valid YAML" in bad.stderr
    bad = cli("config", "set", "-", etcd=etcd, prefix=prefix, stdin="dns: {a_mode: sideways}\n")
    assert bad.returncode == 2 and "dns.a_mode" in bad.stderr and "sideways" in bad.stderr
    history = cli("config", "history", etcd=etcd, prefix=prefix)
    assert history.returncode == 0 and history.stdout.splitlines()[1].split()[1] == "yes"


@pytest.mark.asyncio
async def test_keys_read_only_at_start_are_reported_as_needing_a_restart(make_server) -> None:
    server = await make_server()
    port = server.dns.port
    async with aiohttp.ClientSession() as http:
        status, body = await put_config(http, server, {"dns": {"listen": "127.0.0.1:1", "ttl": 12}})
        assert status == 200
        await eventually(lambda: server.config.version == body["version"])
        shown = await get_config(http, server)
    assert shown["needs_restart"] == ["dns.listen"] and shown["effective"]["dns"]["ttl"] == 12
    assert server.dns.port == port and server.settings.dns.listen != "127.0.0.1:1"


@pytest.mark.asyncio
async def test_a_change_keeps_streams_and_proxied_requests_going(make_server) -> None:
    from aiohttp import web

    hits = 0

    async def hello(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.Response(text="hi")

    app = web.Application()
    app.router.add_get("/hello", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    backend_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server = await make_server()
    try:
        async with aiohttp.ClientSession() as http:
            for i in range(3):
                async with http.post(base(server) + "/v1/agents",
                                     json={**AGENT, "id": f"chat-{i}", "port": backend_port}) as response:
                    assert response.status == 201
            await eventually(lambda: len(server.catalog.snapshot.by_capability.get("chat", ())) == 3)
            async with http.get(base(server) + "/v1/watch") as stream:
                kind, _, first = await next_event(stream)
                assert kind == "snapshot" and len(first["agents"]) == 3
                proxy = "http://{}:{}".format(*server.proxy.address)

                async def load() -> list[int]:
                    statuses = []
                    async with aiohttp.ClientSession() as client:
                        for _ in range(60):
                            async with client.get(proxy + "/hello", headers={"Host": "chat.agents.local"}) as r:
                                statuses.append(r.status)
                    return statuses

                running = asyncio.ensure_future(load())
                versions = []
                for algorithm in ("round_robin", "least_conn", "p2c_ewma", "consistent_hash", "weighted_random"):
                    status, body = await put_config(http, server, {"load_balancer": {"algorithm": algorithm},
                                                                    "proxy": {"read_timeout": "30s"}})
                    assert status == 200
                    versions.append(body["version"])
                    await eventually(lambda v=body["version"]: server.config.version == v)
                statuses = await running
                assert statuses == [200] * 60 and hits >= 60
                async with http.post(base(server) + "/v1/agents", json={**AGENT, "id": "chat-9"}) as response:
                    assert response.status == 201
                kind, _, change = await next_event(stream)
                assert kind == "upsert" and change["agent"]["id"] == "chat-9", "the stream survived the changes"
    finally:
        await runner.cleanup()


class RunningSidecar:
    """``sidecar run`` as a process (the path that reads the stored document at start), read through /v1/config."""

    def __init__(self, etcd: EtcdProcess, prefix: str, config: Path, *, etcd_flags: bool = True) -> None:
        self.admin = free_port()
        self.proxy = free_port()
        flags = ["--etcd-endpoints", etcd.endpoint, "--prefix", prefix] if etcd_flags else []
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "ETCD_"))}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "--config", str(config), *flags,
             "--admin-listen", f"127.0.0.1:{self.admin}", "--dns-listen", f"127.0.0.1:{free_port()}",
             "--proxy-listen", f"127.0.0.1:{self.proxy}", "--grpc-listen", f"127.0.0.1:{free_port()}",
             "--upstream-dns", "none", "--loop", "asyncio"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environ)

    def status(self) -> dict | None:
        """``GET /v1/config``, or None while the admin API is not up."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/v1/config", timeout=2) as response:
                return json.loads(response.read())
        except OSError:
            return None

    def effective(self) -> dict:
        return (self.status() or {}).get("effective", {})

    def wait(self, predicate: Callable[[], object], what: str = "the sidecar") -> None:
        deadline = time.monotonic() + 30
        while not predicate():
            assert self.process.poll() is None, "the sidecar died: " + self.process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def stop(self) -> bytes:
        """SIGTERM; the sidecar must end with status 0. Returns its stderr."""
        self.process.send_signal(signal.SIGTERM)
        _, err = self.process.communicate(timeout=30)
        assert self.process.returncode == 0, err.decode()[-2000:]
        return err

    def __enter__(self) -> RunningSidecar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def test_sighup_rereads_the_file(etcd: EtcdProcess, prefix: str, tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text("service_discovery:\n  dns: {ttl: 5}\n")
    with RunningSidecar(etcd, prefix, config) as sidecar:
        sidecar.wait(lambda: sidecar.effective().get("dns", {}).get("ttl") == 5)
        config.write_text("service_discovery:\n  dns: {ttl: 42}\n")
        sidecar.process.send_signal(signal.SIGHUP)
        sidecar.wait(lambda: sidecar.effective()["dns"]["ttl"] == 42)
        config.write_text("service_discovery:\n  dns: {ttl: [\n")
        sidecar.process.send_signal(signal.SIGHUP)
        assert b"SIGHUP: the configuration file is invalid" in sidecar.stop()


def test_keys_a_version_drops_revert_on_a_sidecar_started_with_a_document(etcd: EtcdProcess, prefix: str,
                                                                          tmp_path: Path) -> None:
    """The document read at start is laid over the file like every later version, never merged into the base."""
    first = cli("config", "set", "-", etcd=etcd, prefix=prefix,
                stdin="dns: {ttl: 10}\nload_balancer: {algorithm: least_conn}\n")
    assert first.returncode == 0, first.stderr
    version = json.loads(cli("config", "show", etcd=etcd, prefix=prefix).stdout)["version"]
    config = tmp_path / "sidecar.yaml"
    config.write_text("service_discovery:\n  dns: {negative_ttl: 3, ttl: 7}\n")

    def in_force() -> tuple[int, int, str, bool]:
        effective = sidecar.effective()
        return (effective["dns"]["ttl"], effective["dns"]["negative_ttl"], effective["load_balancer"]["algorithm"],
                effective["sticky"]["enabled"])

    with RunningSidecar(etcd, prefix, config) as sidecar:
        sidecar.wait(lambda: (sidecar.status() or {}).get("version") == version, "the stored version")
        assert in_force() == (10, 3, "least_conn", True)
        assert sidecar.status()["needs_restart"] == []  # type: ignore[index]

        dropped = cli("config", "set", "-", etcd=etcd, prefix=prefix, stdin="sticky: {enabled: false}\n")
        assert dropped.returncode == 0, dropped.stderr
        sidecar.wait(lambda: not sidecar.effective()["sticky"]["enabled"], "the second version")
        assert in_force() == (7, 3, "weighted_random", False), "keys the version leaves out: file, else default"

        rolled = cli("config", "rollback", str(version), etcd=etcd, prefix=prefix)
        assert rolled.returncode == 0, rolled.stderr
        sidecar.wait(lambda: sidecar.effective()["sticky"]["enabled"], "the rollback")
        assert in_force() == (10, 3, "least_conn", True)

        etcd.ctl("del", config_key(prefix))
        sidecar.wait(lambda: (sidecar.status() or {}).get("version") == 0, "the deletion")
        assert in_force() == (7, 3, "weighted_random", True), "no document: the file, else the defaults"
        sidecar.stop()


@pytest.mark.asyncio
async def test_breaker_states_survive_a_change(make_server) -> None:
    server = await make_server()
    async with aiohttp.ClientSession() as http:
        async with http.post(base(server) + "/v1/agents", json={**AGENT, "id": "dead-1", "capabilities": ["dead"],
                                                                "port": free_port()}) as response:
            assert response.status == 201
        await eventually(lambda: "dead-1" in server.catalog.snapshot.by_id)

        async def breaker() -> str:
            async with http.get(base(server) + "/v1/agents/dead-1") as response:
                return (await response.json())["breaker"]

        proxy = "http://{}:{}".format(*server.proxy.address)

        async def failing() -> bool:
            async with http.get(proxy + "/", headers={"Host": "dead.agents.local"}) as response:
                assert response.status in (502, 503, 504)
            return await breaker() == "open"

        await eventually(failing, what="the breaker to open")
        status, body = await put_config(http, server, {"load_balancer": {"algorithm": "round_robin",
                                                                          "retries": {"attempts": 1}}})
        assert status == 200
        await eventually(lambda: server.config.version == body["version"])
        assert await breaker() == "open", "a configuration change keeps breaker states"


@pytest.mark.asyncio
async def test_a_document_stored_before_start_keeps_its_version(make_server, etcd, prefix) -> None:
    """The version is the key's mod revision, also when the sidecar first lists it (not the list's revision)."""
    stored = cli("config", "set", "-", etcd=etcd, prefix=prefix, stdin="dns: {ttl: 17}\n")
    assert stored.returncode == 0, stored.stderr
    etcd.ctl("put", f"{prefix}/unrelated", "x")  # the store revision moves past the document's
    server = await make_server()
    await eventually(lambda: server.settings.dns.ttl == 17)
    version = json.loads(cli("config", "show", etcd=etcd, prefix=prefix).stdout)["version"]
    async with aiohttp.ClientSession() as http:
        assert (await get_config(http, server))["version"] == version
        status, body = await put_config(http, server, {"dns": {"ttl": 18}})  # CAS on the version in force
        assert status == 200, body


@pytest.mark.asyncio
async def test_a_corrupt_stored_document_is_shown_raw_and_can_be_replaced(make_server, etcd, prefix) -> None:
    """set, rollback and PUT need only the stored version, not a document that parses."""
    server = await make_server()
    key = config_key(prefix)
    assert cli("config", "set", "-", etcd=etcd, prefix=prefix, stdin="dns: {ttl: 9}\n").returncode == 0
    good = json.loads(cli("config", "show", etcd=etcd, prefix=prefix).stdout)["version"]
    await eventually(lambda: server.settings.dns.ttl == 9)

    etcd.ctl("put", key, "{bad")
    await eventually(lambda: server.config.error is not None, what="the rejection")
    shown = cli("config", "show", etcd=etcd, prefix=prefix)
    assert shown.returncode == 1 and "not valid JSON" in shown.stderr
    body = json.loads(shown.stdout)
    assert body["version"] > good and body["document"] is None and body["raw"] == "{bad"
    assert "not valid JSON" in body["error"]
    replaced = cli("config", "set", "-", etcd=etcd, prefix=prefix, stdin="dns: {ttl: 12}\n")
    assert replaced.returncode == 0, replaced.stderr
    await eventually(lambda: server.settings.dns.ttl == 12 and server.config.error is None)

    etcd.ctl("put", key, "[1,")
    await eventually(lambda: server.config.error is not None, what="the second rejection")
    rolled = cli("config", "rollback", str(good), etcd=etcd, prefix=prefix)
    assert rolled.returncode == 0, rolled.stderr
    await eventually(lambda: server.settings.dns.ttl == 9 and server.config.error is None)

    etcd.ctl("put", key, '{"dns": {"ttl": "x"}}')  # JSON, but not a valid document: shown with its error
    await eventually(lambda: server.config.error is not None, what="the third rejection")
    shown = cli("config", "show", etcd=etcd, prefix=prefix)
    assert shown.returncode == 1 and json.loads(shown.stdout)["document"] == {"dns": {"ttl": "x"}}
    assert "dns.ttl" in json.loads(shown.stdout)["error"]
    async with aiohttp.ClientSession() as http:
        status, body = await put_config(http, server, {"dns": {"ttl": 13}})  # no If-Match: the version seen last
        assert status == 200, body
    await eventually(lambda: server.settings.dns.ttl == 13)
