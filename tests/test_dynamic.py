"""Dynamic configuration end to end: two sidecars on a real etcd, the admin API, the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import dns.asyncquery
import dns.message
import pytest
import pytest_asyncio
import yaml
from aiohttp import web

from sidecar.config import merge
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


@pytest_asyncio.fixture
async def backend() -> AsyncIterator[Callable[[web.Application], Awaitable[int]]]:
    """``await backend(app)`` serves an aiohttp app on a free loopback port (its port); stopped after the test."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> int:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    yield start
    for runner in runners:
        await runner.cleanup()


async def register(http: aiohttp.ClientSession, server: Server, count: int, **fields: object) -> None:
    for i in range(count):
        async with http.post(base(server) + "/v1/agents", json={**AGENT, "id": f"chat-{i}", **fields}) as response:
            assert response.status == 201
    await eventually(lambda: len(server.catalog.snapshot.by_capability.get("chat", ())) == count)


@pytest.mark.asyncio
async def test_a_change_keeps_streams_and_requests_in_flight_going(make_server, backend) -> None:
    """Each change is applied while requests are held open at the agents, and while others keep arriving."""
    inside = 0
    release = asyncio.Event()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    async def slow(request: web.Request) -> web.Response:
        nonlocal inside
        inside += 1
        try:
            await asyncio.wait_for(release.wait(), 10)
            await asyncio.sleep(0.5)  # the answer itself takes a while, too
            return web.Response(text="late")
        finally:
            inside -= 1

    app = web.Application()
    app.router.add_get("/hello", hello)
    app.router.add_get("/slow", slow)
    port = await backend(app)
    server = await make_server()
    async with aiohttp.ClientSession() as http:
        await register(http, server, 3, port=port)
        async with http.get(base(server) + "/v1/watch") as stream:
            kind, _, first = await next_event(stream)
            assert kind == "snapshot" and len(first["agents"]) == 3
            proxy = "http://{}:{}".format(*server.proxy.address)
            changing = True

            async def steady(client: aiohttp.ClientSession) -> list[int]:
                statuses = []
                while changing:
                    async with client.get(proxy + "/hello", headers={"Host": "chat.agents.local"}) as r:
                        statuses.append(r.status)
                return statuses

            async def held(client: aiohttp.ClientSession) -> tuple[int, str]:
                async with client.get(proxy + "/slow", headers={"Host": "chat.agents.local"}) as r:
                    return r.status, await r.text()

            async with aiohttp.ClientSession() as client:
                arriving = asyncio.ensure_future(steady(client))
                for algorithm in ("round_robin", "least_conn", "p2c_ewma", "consistent_hash", "weighted_random"):
                    release.clear()
                    wave = [asyncio.ensure_future(held(client)) for _ in range(10)]
                    await eventually(lambda: inside == 10, what="ten requests held at the agents")
                    status, body = await put_config(http, server, {"load_balancer": {"algorithm": algorithm},
                                                                    "proxy": {"read_timeout": "30s"}})
                    assert status == 200
                    await eventually(lambda v=body["version"]: server.config.version == v)
                    assert server.settings.load_balancer.algorithm == algorithm
                    assert inside == 10, "the change was applied while the ten were in flight"
                    release.set()
                    assert await asyncio.gather(*wave) == [(200, "late")] * 10
                changing = False
                statuses = await arriving
            assert len(statuses) > 5 and set(statuses) == {200}
            async with http.post(base(server) + "/v1/agents", json={**AGENT, "id": "chat-9"}) as response:
                assert response.status == 201
            kind, _, change = await next_event(stream)
            assert kind == "upsert" and change["agent"]["id"] == "chat-9", "the stream survived the changes"


@pytest.mark.asyncio
async def test_sticky_pins_survive_a_change(make_server, backend) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application()
    app.router.add_get("/", hello)
    port = await backend(app)
    server = await make_server()
    async with aiohttp.ClientSession() as http:
        await register(http, server, 3, port=port)
        proxy = "http://{}:{}".format(*server.proxy.address)

        async def agent_of(session: str) -> str:
            async with http.get(proxy + "/", headers={"Host": "chat.agents.local", "X-Session-Id": session}) as r:
                assert r.status == 200
                return r.headers["x-sidecar-agent"]

        sessions = [f"s-{i}" for i in range(8)]
        pinned = {session: await agent_of(session) for session in sessions}
        assert len(set(pinned.values())) > 1, "the sessions were spread over the agents"
        assert {session: await agent_of(session) for session in sessions} == pinned
        status, body = await put_config(http, server, {"load_balancer": {"algorithm": "round_robin"},
                                                        "sticky": {"cookie_max_age": "2h"},
                                                        "proxy": {"read_timeout": "30s"}})
        assert status == 200
        await eventually(lambda: server.config.version == body["version"])
        assert server.settings.sticky.cookie_max_age == 7200
        for _ in range(2):
            assert {session: await agent_of(session) for session in sessions} == pinned, "a change keeps pins"


@pytest.mark.asyncio
async def test_latency_estimates_survive_a_change(make_server, backend) -> None:
    async def fast(request: web.Request) -> web.Response:
        return web.Response(text="fast")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return web.Response(text="slow")

    ports = {}
    for name, handler in (("fast", fast), ("slow", slow)):
        app = web.Application()
        app.router.add_get("/", handler)
        ports[name] = await backend(app)
    server = await make_server(load_balancer={"algorithm": "p2c_ewma"})

    def estimates() -> dict[str, float]:
        server.proxy.policy.fold()  # successes are taken in batches
        return {name: server.proxy.policy.loads.peek(name).rtt for name in ports}  # type: ignore[union-attr]

    async with aiohttp.ClientSession() as http:
        for name, port in ports.items():
            async with http.post(base(server) + "/v1/agents", json={**AGENT, "id": name, "port": port}) as response:
                assert response.status == 201
        await eventually(lambda: len(server.catalog.snapshot.by_capability.get("chat", ())) == 2)
        proxy = "http://{}:{}".format(*server.proxy.address)

        async def get(host: str) -> str:
            async with http.get(proxy + "/", headers={"Host": host}) as r:
                assert r.status == 200
                return r.headers["x-sidecar-agent"]

        for name in ports:  # one measured answer from each agent (by id, past the balancer)
            for _ in range(2):
                assert await get(f"{name}.id.agents.local") == name
        before = estimates()
        assert before["slow"] >= 0.3 > before["fast"] >= 0, before
        status, body = await put_config(http, server, {"load_balancer": {"algorithm": "p2c_ewma",
                                                                          "retries": {"attempts": 1}},
                                                        "proxy": {"read_timeout": "30s"}})
        assert status == 200
        await eventually(lambda: server.config.version == body["version"])
        assert server.settings.load_balancer.retries.attempts == 1
        assert estimates() == before, "a change keeps latency estimates"
        # p2c compares both agents: with the estimates kept, the slow one is not picked again.
        assert [await get("chat.agents.local") for _ in range(5)] == ["fast"] * 5


class RunningSidecar:
    """``sidecar run`` as a process (the path that reads the stored document at start), read through /v1/config."""

    def __init__(self, etcd: EtcdProcess, prefix: str, config: Path, *, file: dict | None = None) -> None:
        """With ``file``, etcd and the listeners are written into the file, over ``file``'s sections (no flags)."""
        self.admin = free_port()
        self.proxy = free_port()
        ours = {"etcd": {"endpoints": [etcd.endpoint], "prefix": prefix},
                "admin": {"listen": f"127.0.0.1:{self.admin}"}, "proxy": {"listen": f"127.0.0.1:{self.proxy}"},
                "dns": {"listen": f"127.0.0.1:{free_port()}"}, "grpc": {"listen": f"127.0.0.1:{free_port()}"}}
        if file is None:
            flags = [f"--{section}-listen={ours[section]['listen']}" for section in ("admin", "proxy", "dns", "grpc")]
            flags += ["--etcd-endpoints", etcd.endpoint, "--prefix", prefix]
        else:
            flags = []
            self.sections = merge(ours, file)
            config.write_text(yaml.safe_dump({"service_discovery": self.sections}))
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "ETCD_"))}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "--config", str(config), *flags,
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


def test_sighup_reports_etcd_and_listener_changes_as_needing_a_restart(etcd: EtcdProcess, prefix: str,
                                                                      tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    with RunningSidecar(etcd, prefix, config, file={"dns": {"ttl": 5}}) as sidecar:
        sidecar.wait(lambda: sidecar.effective().get("dns", {}).get("ttl") == 5)
        started = sidecar.effective()
        moved = merge(sidecar.sections, {"etcd": {"endpoints": [etcd.endpoint, "http://127.0.0.1:1"],
                                                  "prefix": prefix + "-moved"},
                                         "proxy": {"listen": f"127.0.0.1:{free_port()}"}, "dns": {"ttl": 6}})
        config.write_text(yaml.safe_dump({"service_discovery": moved}))
        sidecar.process.send_signal(signal.SIGHUP)
        sidecar.wait(lambda: sidecar.effective()["dns"]["ttl"] == 6, "the re-read file")
        assert sidecar.status()["needs_restart"] == ["etcd.endpoints", "etcd.prefix", "proxy.listen"]  # type: ignore[index]
        effective = sidecar.effective()
        assert effective["etcd"] == started["etcd"] and effective["proxy"]["listen"] == started["proxy"]["listen"]
        with socket.create_connection(("127.0.0.1", sidecar.proxy), timeout=5):
            pass  # the proxy still listens where it started
        # ... and the sidecar still follows the document under the prefix it started with.
        assert cli("config", "set", "-", etcd=etcd, prefix=prefix, stdin="dns: {ttl: 8}\n").returncode == 0
        sidecar.wait(lambda: sidecar.effective()["dns"]["ttl"] == 8, "the document under the old prefix")
        assert sidecar.status()["needs_restart"] == ["etcd.endpoints", "etcd.prefix", "proxy.listen"]  # type: ignore[index]
        sidecar.stop()


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
async def test_a_change_of_the_a2a_section_alone_reaches_the_proxy(make_server) -> None:
    server = await make_server()
    async with aiohttp.ClientSession() as http:
        status, body = await put_config(http, server, {"a2a": {"max_body": 4096, "max_card_bytes": 2048}})
        assert status == 200, body
    await eventually(lambda: server.settings.a2a.max_body == 4096, what="the change applied")
    assert (server.proxy.a2a.max_body, server.proxy.a2a.max_card_bytes) == (4096, 2048)
