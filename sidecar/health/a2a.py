"""Reading the local agent's A2A card: from a file, a URL or the well-known paths (parsing: sidecar/cards.py)."""

from __future__ import annotations

import asyncio

import aiohttp

from ..cards import MAX_CARD_BYTES, WELL_KNOWN, Card, decode_card
from ..errors import CardError


async def load_card(source: str, timeout: float, *, limit: int = MAX_CARD_BYTES, etag: str = "") -> Card | None:
    """The card at an http(s) URL or in a file; raises CardError (``missing`` for 404 or no file).

    With ``etag`` (from an earlier read of the same URL) the GET is conditional: None means
    "not modified".
    """
    if source.startswith(("http://", "https://")):
        fetched = await _fetch(source, timeout, limit, etag)
        if fetched is None:
            return None
        raw, new_etag = fetched
        return decode_card(raw, source, etag=new_etag, limit=limit)
    path = source.removeprefix("file://")
    try:
        raw = await asyncio.to_thread(_read_file, path, limit)
    except FileNotFoundError:
        raise CardError(source, "no such file", kind="missing") from None
    except OSError as exc:
        raise CardError(source, f"cannot read: {exc.strerror}") from None
    return decode_card(raw, source, limit=limit)


async def read_card(source: str, timeout: float, *, limit: int = MAX_CARD_BYTES) -> Card:
    """``load_card`` without a condition: always a card (or CardError)."""
    card = await load_card(source, timeout, limit=limit)
    assert card is not None  # only a conditional GET answers "not modified"
    return card


def _read_file(path: str, limit: int) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(limit + 1)


async def discover_card(port: int, timeout: float, host: str = "127.0.0.1", *,
                        limit: int = MAX_CARD_BYTES) -> Card:
    """The card the agent serves at the well-known paths (agent-card.json, then the older agent.json).

    Raises CardError with ``missing`` set when neither path has one.
    """
    tried: list[str] = []
    for path in WELL_KNOWN:
        url = f"http://{host}:{port}{path}"
        try:
            return await read_card(url, timeout, limit=limit)
        except CardError as exc:
            if not exc.missing:
                raise
            tried.append(url)
    raise CardError(" and ".join(tried), "not found (HTTP 404)", kind="missing")


async def _fetch(url: str, timeout: float, limit: int, etag: str) -> tuple[bytes, str] | None:
    headers = {"Accept": "application/json"}
    if etag:
        headers["If-None-Match"] = etag
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.get(url, allow_redirects=False, headers=headers) as response:
                if response.status == 304 and etag:
                    return None
                if response.status == 404:
                    raise CardError(url, "not found (HTTP 404)", kind="missing")
                if response.status != 200:
                    raise CardError(url, f"HTTP {response.status}")
                raw = await response.content.read(limit + 1)
                return raw, response.headers.get("ETag", "")
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise CardError(url, f"cannot fetch: {type(exc).__name__}: {exc}", kind="unreachable") from None
