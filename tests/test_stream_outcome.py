"""An ExecuteStream whose result was sent ends as that result, never as CANCELLED.

A real server on localhost: the Python clients must half-close their requests
and read the stream to its end (no cancel after the result), and the server
must log and count an execution whose result it sent as that result (OK or
the trap) even when a client cancels right after receiving it, as a raw
client does here. The request log lines are captured, the metrics scraped
over HTTP like Prometheus does.
"""

from __future__ import annotations

import asyncio
import io
import json
import queue
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import pytest
from support import free_port, request_log_lines, scrape_metrics

from bpfexec._pb.bpfexec.v1 import executor_pb2 as pb
from bpfexec._pb.bpfexec.v1 import executor_pb2_grpc as pb_grpc
from bpfexec.client.aio import AsyncClient
from bpfexec.client.client import Client, HelperCall
from bpfexec.server.app import RunningServer, serve_in_thread
from bpfexec.server.service import ExecutorServicer
from bpfexec.server.settings import Settings

TIMEOUT = 10.0
RUNS = 40
CALL_MUL = b"r1 = 6\nr2 = 7\ncall mul\nexit\n"
CALL_MUL_THEN_FAULT = b"r1 = 6\nr2 = 7\ncall mul\nr0 = *(u64 *)(r0 + 0)\nexit\n"


def mul(call: HelperCall, a: int, b: int, *_: int) -> int:
    return a * b


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    with request_log_lines() as stream:
        yield stream


@pytest.fixture
def server() -> Iterator[RunningServer]:
    settings = Settings(port=0, metrics_port=free_port(), entry_point_helpers=False)
    with serve_in_thread(settings) as running:
        yield running


def stream_outcomes(stream: io.StringIO, count: int) -> list[str]:
    """The outcomes of the first `count` ExecuteStream lines (a line is written once
    the server has finished the call, possibly just after the client saw its result)."""

    def logged() -> list[str]:
        records = [json.loads(line) for line in stream.getvalue().splitlines()]
        return [str(r["outcome"]) for r in records if r["method"] == "ExecuteStream"]

    deadline = time.monotonic() + TIMEOUT
    while len(logged()) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return logged()


def stream_codes(server: RunningServer, count: int) -> dict[str, float]:
    """`grpc_server_handled_total` of ExecuteStream by code, once `count` calls are counted."""

    def handled() -> dict[str, float]:
        samples = scrape_metrics(server.metrics_port, TIMEOUT)
        return {
            labels["grpc_code"]: value
            for (name, frozen), value in samples.items()
            if name == "grpc_server_handled_total"
            and (labels := dict(frozen))["grpc_method"] == "ExecuteStream"
            and value
        }

    deadline = time.monotonic() + TIMEOUT
    while sum(handled().values()) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return handled()


def executions(server: RunningServer) -> dict[str, float]:
    samples = scrape_metrics(server.metrics_port, TIMEOUT)
    return {
        dict(frozen)["outcome"]: value
        for (name, frozen), value in samples.items()
        if name == "bpfexec_executions_total"
    }


def run_blocking(server: RunningServer, code: bytes, runs: int = RUNS) -> list[tuple[int, object]]:
    with Client(server.address, timeout=TIMEOUT) as client:
        module = client.load(code)
        results = [client.execute(module, helpers={"mul": mul}) for _ in range(runs)]
    return [(r.return_value, r.trap and r.trap.kind) for r in results]


def run_async(server: RunningServer, code: bytes, runs: int = RUNS) -> list[tuple[int, object]]:
    async def main() -> list[tuple[int, object]]:
        async with AsyncClient(server.address, timeout=TIMEOUT) as client:
            module = await client.load(code)
            results = [await client.execute(module, helpers={"mul": mul}) for _ in range(runs)]
        return [(r.return_value, r.trap and r.trap.kind) for r in results]

    return asyncio.run(main())


def run_raw_cancelling(
    server: RunningServer, code: bytes, runs: int = RUNS
) -> list[tuple[int, object]]:
    """A client that cancels the call as soon as it holds the result, before the
    server's status: what the Python clients did, and what any client may do."""
    results: list[tuple[int, object]] = []
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ExecutorStub(channel)
        module_id = stub.LoadModule(pb.LoadModuleRequest(code=code), timeout=TIMEOUT).id
        start = pb.ExecuteStart(request=pb.ExecuteRequest(module_id=module_id))
        start.helper_names.append("mul")
        for _ in range(runs):
            outbox: list[pb.ExecuteStreamRequest] = [pb.ExecuteStreamRequest(start=start)]
            requests = _Requests(outbox)
            call = stub.ExecuteStream(iter(requests), timeout=TIMEOUT)
            for message in call:
                if message.WhichOneof("message") == "helper_call":
                    helper_call = message.helper_call
                    value = helper_call.args[0] * helper_call.args[1]
                    answer = pb.HelperResult(call_id=helper_call.call_id, value=value)
                    requests.send(pb.ExecuteStreamRequest(helper_result=answer))
                else:
                    result = message.result
                    results.append((result.return_value, result.trap.kind or None))
                    call.cancel()
                    break
            requests.send(None)
    return results


class _Requests:
    """A request iterator fed by the test, ended by None."""

    def __init__(self, first: list[pb.ExecuteStreamRequest]) -> None:
        self._queue: queue.SimpleQueue[pb.ExecuteStreamRequest | None] = queue.SimpleQueue()
        for message in first:
            self._queue.put(message)

    def send(self, message: pb.ExecuteStreamRequest | None) -> None:
        self._queue.put(message)

    def __iter__(self) -> Iterator[pb.ExecuteStreamRequest]:
        while (message := self._queue.get()) is not None:
            yield message


Runner = Callable[[RunningServer, bytes, int], list[tuple[int, object]]]


@pytest.mark.parametrize("runner", [run_blocking, run_async, run_raw_cancelling])
@pytest.mark.parametrize(
    ("code", "expected"), [(CALL_MUL, (42, None)), (CALL_MUL_THEN_FAULT, (0, "MEMORY_FAULT"))]
)
def test_a_sent_result_is_the_outcome_even_if_the_client_then_goes_away(
    server: RunningServer,
    lines: io.StringIO,
    runner: Runner,
    code: bytes,
    expected: tuple[int, object],
) -> None:
    results = runner(server, code, RUNS)
    assert [(value, str(kind) if kind else None) for value, kind in results] == [expected] * RUNS
    outcome = expected[1] or "OK"
    assert stream_outcomes(lines, RUNS) == [outcome] * RUNS
    assert stream_codes(server, RUNS) == {"OK": RUNS}
    assert executions(server) == {outcome: RUNS}


@pytest.fixture
def slow_to_finish(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's ExecuteStream, which after sending the result waits for the client
    to go away before it finishes: the race a loaded server loses, made certain."""
    original = ExecutorServicer.ExecuteStream

    async def execute_stream(
        self: ExecutorServicer, requests: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ExecuteStreamResponse]:
        async for message in original(self, requests, context):
            yield message
            if message.WhichOneof("message") == "result":
                deadline = time.monotonic() + TIMEOUT
                while not context.cancelled() and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)

    monkeypatch.setattr(ExecutorServicer, "ExecuteStream", execute_stream)


@pytest.mark.parametrize(
    ("code", "expected"), [(CALL_MUL, (42, None)), (CALL_MUL_THEN_FAULT, (0, "MEMORY_FAULT"))]
)
def test_a_client_cancelling_after_the_result_does_not_make_it_cancelled(
    slow_to_finish: None,
    server: RunningServer,
    lines: io.StringIO,
    code: bytes,
    expected: tuple[int, object],
) -> None:
    runs = 5
    results = run_raw_cancelling(server, code, runs)
    assert [(value, str(kind) if kind else None) for value, kind in results] == [expected] * runs
    outcome = expected[1] or "OK"
    assert stream_outcomes(lines, runs) == [outcome] * runs
    assert stream_codes(server, runs) == {"OK": runs}
    assert executions(server) == {outcome: runs}
