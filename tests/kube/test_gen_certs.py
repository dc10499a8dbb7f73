"""deploy/kubernetes/gen-certs.sh, run with a stand-in kubectl: the Secret and caBundle it writes make a
certificate chain the webhook serves and a client that trusts the bundle accepts for the Service name."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.kube.inject import InjectOptions
from sidecar.kube.webhook import Webhook

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "gen-certs.sh"
SERVICE_NAME = "sidecar-webhook.sidecar-system.svc"

# Records each call; `create secret tls ... -o yaml` prints the Secret as JSON (valid YAML), `apply -f -`
# and `patch` store what they were given.
FAKE_KUBECTL = """#!{python}
import base64, json, os, sys
args = sys.argv[1:]
out = os.environ["FAKE_KUBECTL_DIR"]
if "create" in args:
    cert, key = args[args.index("--cert") + 1], args[args.index("--key") + 1]
    data = {{k: base64.b64encode(open(p, "rb").read()).decode() for k, p in (("tls.crt", cert), ("tls.key", key))}}
    print(json.dumps({{"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                      "metadata": {{"name": args[args.index("tls") + 1]}}, "data": data}}))
elif "apply" in args:
    open(os.path.join(out, "applied.json"), "w").write(sys.stdin.read())
elif "patch" in args:
    open(os.path.join(out, "patch.json"), "w").write(args[args.index("-p") + 1])
"""


@pytest.mark.asyncio
async def test_gen_certs_makes_a_chain_for_the_service_name(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.format(python=sys.executable))
    kubectl.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_KUBECTL_DIR": str(tmp_path)}
    done = await asyncio.to_thread(subprocess.run, ["sh", str(SCRIPT), "2"], capture_output=True, text=True,
                                   env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    secret = json.loads((tmp_path / "applied.json").read_text())
    assert secret["metadata"]["name"] == "sidecar-webhook-tls" and secret["type"] == "kubernetes.io/tls"
    (op,) = json.loads((tmp_path / "patch.json").read_text())
    assert op["path"] == "/webhooks/0/clientConfig/caBundle"
    for key in ("tls.crt", "tls.key"):
        (tmp_path / key).write_bytes(base64.b64decode(secret["data"][key]))
    webhook = Webhook(InjectOptions(upstream_dns=("10.96.0.10",)), "127.0.0.1:0", str(tmp_path / "tls.crt"),
                      str(tmp_path / "tls.key"))
    await webhook.start()
    try:
        trust = ssl.create_default_context(cadata=base64.b64decode(op["value"]).decode())
        # The API server dials the Service name; the certificate must verify for it under the bundle's CA.
        _, writer = await asyncio.open_connection("127.0.0.1", webhook.port, ssl=trust, server_hostname=SERVICE_NAME)
        writer.close()
        await writer.wait_closed()
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection("127.0.0.1", webhook.port, ssl=trust, server_hostname="other.example")
    finally:
        await webhook.stop()
