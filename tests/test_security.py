"""Security checks: the token guards every mutation, loopback by default, no taking over another owner's agent id."""

from __future__ import annotations

import aiohttp
import pytest

from sidecar.config import HostPort, Settings

from .waiting import eventually

AGENT = {"id": "owned-1", "name": "owned", "address": "127.0.0.1", "port": 9100, "capabilities": ["own"],
         "ttl": "10s"}


def base(server) -> str:
    return "http://{}:{}".format(*server.admin.address)


def test_every_listener_is_on_loopback_by_default() -> None:
    settings = Settings()
    for listen in (settings.admin.listen, settings.proxy.listen, settings.dns.listen, settings.grpc.listen):
        assert HostPort.parse(listen).host == "127.0.0.1", listen


@pytest.mark.etcd
@pytest.mark.asyncio
async def test_every_mutation_needs_the_token(make_server) -> None:
    server = await make_server(admin={"token": "s3cret"})
    good = {"Authorization": "Bearer s3cret"}
    async with aiohttp.ClientSession() as http:
        for method, path, body in (("POST", "/v1/agents", AGENT), ("DELETE", "/v1/agents/owned-1", None),
                                   ("PUT", "/v1/config", {"dns": {"ttl": 9}})):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                async with http.request(method, base(server) + path, json=body, headers=headers) as response:
                    assert response.status == 401, (method, path, headers)
                    assert (await response.json())["code"] == "unauthorized"
        async with http.post(base(server) + "/v1/agents", json=AGENT, headers=good) as response:
            assert response.status == 201
        async with http.get(base(server) + "/v1/agents") as response:
            assert response.status == 200, "reads need no token"


@pytest.mark.etcd
@pytest.mark.asyncio
async def test_an_agent_id_cannot_be_taken_over_by_another_owner(make_server) -> None:
    first, second = await make_server(), await make_server()
    async with aiohttp.ClientSession() as http:
        async with http.post(base(first) + "/v1/agents", json=AGENT) as response:
            assert response.status == 201
        async with http.post(base(second) + "/v1/agents", json={**AGENT, "port": 6666}) as response:
            body = await response.json()
            assert response.status == 409 and body["code"] == "agent_exists", body
        async with http.post(base(first) + "/v1/agents", json={**AGENT, "port": 9101}) as response:
            assert response.status == 201, "its owner may change it"
        await eventually(lambda: [a.port for a in second.catalog.snapshot.select(agent_id="owned-1")] == [9101])
        async with http.delete(base(first) + "/v1/agents/owned-1") as response:
            assert response.status == 204
        async with http.post(base(second) + "/v1/agents", json={**AGENT, "port": 6666}) as response:
            assert response.status == 201, "free again once its owner let it go"
