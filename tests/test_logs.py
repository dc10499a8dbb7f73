"""Structured logs: the JSON formatter's fields, and `sidecar run --log-format json` on stderr."""

from __future__ import annotations

import io
import json
import logging
import math
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from sidecar.logs import TEXT_FORMAT, JsonFormatter, stderr_handler

from .etcd_process import EtcdProcess, free_port


@pytest.fixture
def logged() -> Iterator[Callable[..., list[dict[str, Any]]]]:
    """``logged(lambda log: log.info(...))`` -> the JSON objects the formatter wrote, one per line."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.logs")
    logger.addHandler(handler)
    logger.propagate, logger.level = False, logging.DEBUG

    def run(call: Callable[[logging.Logger], None]) -> list[dict[str, Any]]:
        out.seek(0)
        out.truncate()
        call(logger)
        return [json.loads(line) for line in out.getvalue().splitlines()]

    yield run
    logger.removeHandler(handler)


def test_core_fields_and_extras(logged) -> None:
    before = datetime.now(UTC)
    [line] = logged(lambda log: log.warning("agent %s gone", "chat-1",
                                            extra={"method": "GET", "status": 503, "agent": {"id": "chat-1"}}))
    assert {k: line[k] for k in ("level", "logger", "msg")} == {
        "level": "warning", "logger": "tests.logs", "msg": "agent chat-1 gone"}
    assert line["ts"].endswith("Z")
    ts = datetime.fromisoformat(line["ts"].replace("Z", "+00:00"))
    assert ts.utcoffset() is not None and ts.utcoffset().total_seconds() == 0
    assert abs((ts - before).total_seconds()) < 60  # the record's own time, in UTC (not a local clock's hour)
    assert line["method"] == "GET" and line["status"] == 503 and line["agent"] == {"id": "chat-1"}
    assert "exc" not in line and "trace_id" not in line


def test_an_extra_named_like_a_core_field_does_not_replace_it(logged) -> None:
    [line] = logged(lambda log: log.info("hello", extra={"ts": "mine", "level": 7}))
    assert line["extra_ts"] == "mine" and line["extra_level"] == 7
    assert line["level"] == "info" and line["ts"] != "mine"


def test_exception_text(logged) -> None:
    def fail(log: logging.Logger) -> None:
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("it failed")

    [line] = logged(fail)
    assert line["msg"] == "it failed" and line["level"] == "error"
    assert line["exc"].startswith("Traceback") and line["exc"].rstrip().endswith("ValueError: boom")


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        return "<Unprintable>"


def test_values_json_cannot_carry_are_written_as_text(logged) -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    [line] = logged(lambda log: log.info("odd", extra={
        "address": ("127.0.0.1", 80), "peer": object(), "ids": {"a"}, "loop": loop, "ratio": math.nan,
        "thing": Unprintable(), "fine": 1.5}))
    assert line["address"] == ["127.0.0.1", 80] and line["fine"] == 1.5
    assert line["peer"].startswith("<object object at") and line["ids"] == "{'a'}"
    assert line["loop"] == "{'self': {...}}" and line["ratio"] == "nan" and line["thing"] == "<Unprintable>"
    assert line["msg"] == "odd"  # the fields JSON can carry are kept as they are


def test_trace_and_span_of_the_current_span(logged) -> None:
    trace = pytest.importorskip("opentelemetry.trace")
    context = trace.SpanContext(trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736, span_id=0x00F067AA0BA902B7,
                                is_remote=False, trace_flags=trace.TraceFlags(1))
    with trace.use_span(trace.NonRecordingSpan(context)):
        [inside] = logged(lambda log: log.info("in a span"))
        [explicit] = logged(lambda log: log.info("access", extra={"trace_id": "from-the-request"}))
    [outside] = logged(lambda log: log.info("no span"))
    assert inside["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736" and inside["span_id"] == "00f067aa0ba902b7"
    assert explicit["trace_id"] == "from-the-request"  # what the caller passed wins
    assert "trace_id" not in outside and "span_id" not in outside


def test_works_without_opentelemetry(monkeypatch) -> None:
    for name in [n for n in sys.modules if n == "opentelemetry" or n.startswith("opentelemetry.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import now raises ImportError
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "plain %d", (1,), None)
    assert json.loads(JsonFormatter().format(record))["msg"] == "plain 1"


def test_text_is_the_default_format() -> None:
    assert stderr_handler("text").formatter._fmt == TEXT_FORMAT  # type: ignore[union-attr]
    assert isinstance(stderr_handler("json").formatter, JsonFormatter)


@pytest.mark.etcd
def test_run_with_log_format_json_writes_json_lines_to_stderr(etcd: EtcdProcess, prefix: str) -> None:
    command = [sys.executable, "-m", "sidecar", "run", "--log-format", "json", "--loop", "asyncio",
               "--etcd-endpoints", etcd.endpoint, "--prefix", prefix, "--admin-listen", f"127.0.0.1:{free_port()}",
               "--dns-listen", f"127.0.0.1:{free_port()}", "--proxy-listen", f"127.0.0.1:{free_port()}",
               "--grpc-listen", f"127.0.0.1:{free_port()}", "--upstream-dns", "none"]
    lines = []
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as process:
        try:
            assert process.stderr is not None
            for line in process.stderr:  # until the admin API (started last) says where it listens, or EOF
                lines.append(line)
                if "admin API on" in line:
                    break
            process.send_signal(signal.SIGTERM)
            lines += process.stderr.readlines()
            assert process.wait(30) == 0, "".join(lines)
        finally:
            if process.poll() is None:
                process.kill()
    records = [json.loads(line) for line in lines if line.strip()]  # every line is one JSON object
    assert any(r["logger"] == "sidecar.admin" and r["msg"].startswith("admin API on") for r in records), lines
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)


def test_run_rejects_an_unknown_log_format() -> None:
    result = subprocess.run([sys.executable, "-m", "sidecar", "run", "--log-format", "xml"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "log_format" in result.stderr and "xml" in result.stderr, result.stderr
