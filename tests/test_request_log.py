"""One log line per request: method, module, function, outcome, fuel, duration, peer.

A real server on localhost with authentication; the lines of the
`bpfexec.requests` logger are captured through the JSON formatter that
`--log-format json` installs, parsed back, and checked for their fields and
for the absence of any token.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import request_log_lines

from bpfexec.client.client import Client
from bpfexec.client.errors import NotFound, Unauthenticated
from bpfexec.server.app import RunningServer, serve_in_thread
from bpfexec.server.request_log import configure_logging
from bpfexec.server.settings import Settings

TOKEN = "t0ps3cret-request-log"
ADD_ONE = b"r0 = r1\nr0 += 1\nexit\n"
CALL_MUL = b"r1 = 6\nr2 = 7\ncall mul\nexit\n"
TIMEOUT = 10.0


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    with request_log_lines() as stream:
        yield stream


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"team-a:{TOKEN}\n")
    settings = Settings(
        port=0, metrics_port=0, entry_point_helpers=False, auth_tokens_file=str(tokens)
    )
    with serve_in_thread(settings) as running:
        yield running


def records(stream: io.StringIO, count: int) -> list[dict[str, object]]:
    """The first `count` lines; an aborted call is logged just after its status is sent."""
    deadline = time.monotonic() + TIMEOUT
    while len(stream.getvalue().splitlines()) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_each_request_is_one_json_line_without_secrets(
    server: RunningServer, lines: io.StringIO
) -> None:
    with Client(server.address, timeout=TIMEOUT, token=TOKEN) as client:
        module = client.load(ADD_ONE)
        client.execute(module, args=[1])
        client.execute(client.load(CALL_MUL), helpers={"mul": lambda call, a, b, *_: a * b})
        with pytest.raises(NotFound):
            client.get_module("sha256:" + "0" * 64)
    load, execute, _, stream, missing = records(lines, 5)
    assert load["method"] == "LoadModule" and load["module"] == module.id
    assert load["outcome"] == "OK" and load["tenant"] == "team-a"
    assert execute["method"] == "Execute"
    assert execute["module"] == module.id and execute["outcome"] == "OK"
    assert execute["fuel"] == 3
    assert isinstance(execute["duration_ms"], float)
    assert str(execute["peer"]).startswith("ipv4:127.0.0.1:")
    assert stream["method"] == "ExecuteStream" and stream["outcome"] == "OK"
    assert stream["fuel"] == 4
    assert missing["outcome"] == "NOT_FOUND"
    assert TOKEN not in lines.getvalue()


def test_a_trap_is_the_outcome_and_health_is_not_logged(
    server: RunningServer, lines: io.StringIO
) -> None:
    from bpfexec.client.cli_remote import check_health

    assert check_health(server.address, timeout=TIMEOUT) == "SERVING"
    with Client(server.address, timeout=TIMEOUT, token=TOKEN) as client:
        client.execute(client.load(b"r0 = *(u64 *)(r1 + 0)\nexit\n"))
    (_, execute) = records(lines, 2)
    assert execute["outcome"] == "MEMORY_FAULT"


def test_a_refused_call_is_logged_without_its_token(
    server: RunningServer, lines: io.StringIO
) -> None:
    with (
        Client(server.address, timeout=TIMEOUT, token="not-" + TOKEN) as intruder,
        pytest.raises(Unauthenticated),
    ):
        intruder.list_modules()
    (refused,) = records(lines, 1)
    assert refused["method"] == "ListModules" and refused["outcome"] == "UNAUTHENTICATED"
    assert TOKEN not in lines.getvalue()


def test_configure_logging_json(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("json")
        logging.getLogger("bpfexec.requests").info(
            "Execute", extra={"request": {"method": "Execute", "fuel": 7}}
        )
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    assert line["method"] == "Execute" and line["fuel"] == 7 and line["level"] == "INFO"
