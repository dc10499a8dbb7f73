"""The mutating admission webhook: an aiohttp TLS server around :func:`admission.review`.

``POST /mutate`` takes an AdmissionReview and answers one; ``GET /healthz`` and ``/readyz``
serve the Deployment's probes. The certificate and key files are re-read when they change
(cert-manager rotates them in place), so a rotation needs no restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl

from aiohttp import web

from ..errors import ConfigError
from ..tasks import cancel_and_wait
from .admission import BadReview, review
from .inject import InjectOptions

log = logging.getLogger("sidecar.webhook")
MAX_BODY = 8 * 1024 * 1024
# The path the MutatingWebhookConfiguration calls (deploy/kubernetes/webhook.yaml).
MUTATE_PATH = "/mutate"


class Webhook:
    """Serves AdmissionReviews over TLS on ``listen`` until stopped."""

    def __init__(self, options: InjectOptions, listen: str, cert_file: str, key_file: str,
                 reload_interval: float = 30.0) -> None:
        self.options = options
        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError("--listen", listen, "must be HOST:PORT, e.g. 0.0.0.0:8443")
        self.host, self.port = host.strip("[]"), int(port)
        self.cert_file, self.key_file = cert_file, key_file
        self.reload_interval = reload_interval
        self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.tls.minimum_version = ssl.TLSVersion.TLSv1_2
        self._loaded = self._load()
        self.app = web.Application(client_max_size=MAX_BODY)
        self.app.add_routes([web.post(MUTATE_PATH, self.mutate), web.get("/healthz", self.healthz),
                             web.get("/readyz", self.healthz)])
        self._runner: web.AppRunner | None = None
        self._reloader: asyncio.Task[None] | None = None

    def _load(self) -> tuple[int, int]:
        try:
            stamp = (os.stat(self.cert_file).st_mtime_ns, os.stat(self.key_file).st_mtime_ns)
            self.tls.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("--tls-cert/--tls-key", f"{self.cert_file}, {self.key_file}",
                              f"cannot load the certificate and key: {exc}") from None
        return stamp

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.tls, reuse_address=True)
        await site.start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])
        self._reloader = asyncio.get_running_loop().create_task(self._reload(), name="webhook-cert-reload")
        log.info("webhook listening on https://%s:%d/mutate", self.host, self.port)

    async def stop(self) -> None:
        if self._reloader is not None:
            await cancel_and_wait(self._reloader)
        if self._runner is not None:
            await self._runner.cleanup()

    async def run(self, stop: asyncio.Event) -> int:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()
        return 0

    def reload_if_changed(self) -> bool:
        """Load the certificate and key again if either file changed; True when it did."""
        try:
            stamp = (os.stat(self.cert_file).st_mtime_ns, os.stat(self.key_file).st_mtime_ns)
            if stamp == self._loaded:
                return False
            self._loaded = self._load()
        except (OSError, ConfigError) as exc:
            # Mid-rotation the pair can disagree for a moment; the old one stays in use.
            log.warning("keeping the current TLS certificate: %s", exc)
            return False
        log.info("reloaded the TLS certificate %s", self.cert_file)
        return True

    async def _reload(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            self.reload_if_changed()

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def mutate(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
            answer, outcome = review(body, self.options)
        except (ValueError, BadReview) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        dry = bool((body.get("request") or {}).get("dryRun"))
        log.info("%s%s", outcome, " (dry run)" if dry else "")
        return web.json_response(answer)
