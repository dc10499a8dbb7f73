"""`sidecar dev`, the embedded default, as a user runs it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import dns.message
import dns.query
import pytest

pytestmark = pytest.mark.etcd


def test_dev_serves_demo_agents_and_cleans_up() -> None:
    with subprocess.Popen([sys.executable, "-m", "sidecar", "dev", "--loop", "asyncio"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as process:
        try:
            assert process.stdout is not None
            banner = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                line = process.stdout.readline()
                assert line, "sidecar dev exited early:\n" + "".join(banner)
                banner.append(line)
                if line.startswith("  ETCD_ENDPOINTS="):
                    break
            text = "".join(banner)
            etcd = re.search(r"etcd\s+(http://127\.0\.0\.1:\d+)", text)
            assert etcd, text
            with urllib.request.urlopen("http://127.0.0.1:15000/v1/agents", timeout=5) as response:
                agents = json.load(response)["agents"]
            assert sorted(a["id"] for a in agents) == ["chat-1", "chat-2", "research-1", "summarizer-1"]
            with urllib.request.urlopen("http://127.0.0.1:15000/v1/cards?capability=research", timeout=5) as response:
                assert [c["id"] for c in json.load(response)["cards"]] == ["research-1"]
            # The SDK agent through the proxy, as the banner shows it: its card, then a JSON-RPC SendMessage.
            proxy = urllib.request.build_opener(urllib.request.ProxyHandler({"http": "http://127.0.0.1:15001"}))
            with proxy.open("http://research.agents.local/.well-known/agent-card.json", timeout=5) as response:
                assert [s["id"] for s in json.load(response)["skills"]] == ["research"]
            send = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": {
                "role": "ROLE_USER", "messageId": "m1", "parts": [{"text": "ping"}]}}}
            request = urllib.request.Request("http://research.agents.local/", data=json.dumps(send).encode(),
                                             headers={"Content-Type": "application/json", "A2A-Version": "1.0"})
            with proxy.open(request, timeout=5) as response:
                assert json.load(response)["result"]["message"]["parts"] == [{"text": "pong from research-1"}]
            answer = dns.query.udp(dns.message.make_query("chat.agents.local", "SRV"), "127.0.0.1", port=15053,
                                   timeout=5)
            assert len(answer.answer[0]) == 2
            request = urllib.request.Request("http://127.0.0.1:15001/hello", headers={"Host": "chat.agents.local"})
            with urllib.request.urlopen(request, timeout=5) as response:
                assert json.load(response)["agent"] in ("chat-1", "chat-2")
            env = {**os.environ, "ETCD_ENDPOINTS": etcd.group(1)}
            table = subprocess.run([sys.executable, "-m", "sidecar", "agents", "--capability", "summarize"],
                                   capture_output=True, text=True, env=env, timeout=30)
            assert table.stdout.splitlines()[1].split()[0] == "summarizer-1"
            process.send_signal(signal.SIGINT)
            assert process.wait(30) == 0
            with pytest.raises(OSError):
                urllib.request.urlopen(etcd.group(1) + "/health", timeout=2)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
