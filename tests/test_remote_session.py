"""`RemoteHelpers` without a network: a worker thread parked in a remote helper call,
and the event loop that answers, times out or cancels it (server/remote.py).

The worker waits on a bare lock, and an answer wakes it from a callback queued on
the loop; these tests pin down what that hand-off must keep: the value or trap
the worker gets, that a timed-out call ignores its late answer, and that a
cancelled stream wakes a parked worker at once.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from bpfexec.server.metrics import Metrics
from bpfexec.server.remote import HelperCall, ProtocolViolation, RemoteHelpers
from bpfexec.vm import Trap, TrapKind

TIMEOUT = 5.0


class Memory:
    """The bits of a HelperContext a remote call touches; address 0 faults."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def read(self, address: int, size: int) -> bytes:
        if address == 0:
            raise Trap(TrapKind.MEMORY_FAULT, "read of address 0")
        return bytes(size)

    def log(self, text: str) -> None:
        self.lines.append(text)


class Session:
    """A session whose loop runs in a thread and whose calls run on a worker thread."""

    def __init__(self, timeout: float = TIMEOUT) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sent: queue.Queue[HelperCall] = queue.Queue()
        self.metrics = Metrics()
        self.helpers = RemoteHelpers(
            [100], ["mul"], shadows=lambda ref: False, timeout=timeout,
            metrics=self.metrics, send=self.sent.put, loop=self.loop,
        )  # fmt: skip
        self.worker = ThreadPoolExecutor(1)

    def call(self, key: int | str = 100, context: Any = None) -> Future[int]:
        context = context if context is not None else Memory()
        return self.worker.submit(self.helpers.call, key, context, (1, 2, 3, 4, 5))

    def on_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on the loop, as the servicer does, and return what it returned."""

        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(TIMEOUT)

    def close(self) -> None:
        self.on_loop(self.helpers.cancel)
        self.worker.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()

    def observed(self) -> float:
        for metric in self.metrics.remote_helper_seconds.collect():
            for sample in metric.samples:
                if sample.name.endswith("_count"):
                    return sample.value
        return 0.0


@pytest.fixture()
def session() -> Iterator[Session]:
    made = Session()
    yield made
    made.close()


def test_an_answer_wakes_the_worker_with_its_value(session: Session) -> None:
    for call_id in (1, 2, 3):
        result = session.call()
        sent = session.sent.get(timeout=TIMEOUT)
        assert sent == HelperCall(call_id, 100, (1, 2, 3, 4, 5))
        session.on_loop(session.helpers.answer, call_id, 40 + call_id, None)
        assert result.result(TIMEOUT) == 40 + call_id
    assert session.observed() == 3  # each round trip timed in bpfexec_remote_helper_seconds


def test_memory_and_log_while_parked_then_an_error_answer(session: Session) -> None:
    memory = Memory()
    result = session.call("mul", memory)
    assert session.sent.get(timeout=TIMEOUT).helper == "mul"
    assert session.on_loop(session.helpers.read, 1, 8, 4) == bytes(4)
    session.on_loop(session.helpers.log, 1, "hello")
    session.on_loop(session.helpers.answer, 1, None, "boom")
    with pytest.raises(Trap) as trap:
        result.result(TIMEOUT)
    assert trap.value.kind is TrapKind.HELPER_ERROR
    assert "remote helper mul failed: boom" in trap.value.message
    assert memory.lines == ["hello"]
    with pytest.raises(ProtocolViolation, match="no helper call is pending"):
        session.on_loop(session.helpers.answer, 1, 0, None)  # answered once already


def test_a_faulting_read_then_an_error_is_that_fault(session: Session) -> None:
    result = session.call()
    session.sent.get(timeout=TIMEOUT)
    with pytest.raises(Trap):
        session.on_loop(session.helpers.read, 1, 0, 8)
    session.on_loop(session.helpers.answer, 1, None, "could not read")
    with pytest.raises(Trap) as trap:
        result.result(TIMEOUT)
    assert trap.value.kind is TrapKind.MEMORY_FAULT


def test_a_timed_out_call_ignores_its_late_answer() -> None:
    session = Session(timeout=0.2)
    try:
        result = session.call()
        session.sent.get(timeout=TIMEOUT)
        with pytest.raises(Trap) as trap:
            result.result(TIMEOUT)
        assert trap.value.kind is TrapKind.HELPER_ERROR
        assert "did not answer call 1 within 0.2 s" in trap.value.message
        session.on_loop(session.helpers.answer, 1, 5, None)  # ignored, no violation
        with pytest.raises(Trap, match="timed out"):
            session.on_loop(session.helpers.read, 1, 8, 1)
        # The next call goes on normally.
        result = session.call()
        assert session.sent.get(timeout=TIMEOUT).call_id == 2
        session.on_loop(session.helpers.answer, 2, 9, None)
        assert result.result(TIMEOUT) == 9
    finally:
        session.close()


def test_a_cancelled_stream_wakes_a_parked_worker_at_once(session: Session) -> None:
    result = session.call()
    session.sent.get(timeout=TIMEOUT)
    started = time.monotonic()
    session.on_loop(session.helpers.cancel)
    with pytest.raises(Trap) as trap:
        result.result(TIMEOUT)
    assert trap.value.kind is TrapKind.CANCELLED
    assert time.monotonic() - started < 1.0
    with pytest.raises(Trap, match="cannot be answered"):
        session.call().result(TIMEOUT)  # nothing more is sent once the stream is gone
    assert session.sent.empty()


def test_a_client_that_closes_its_side_fails_the_pending_call(session: Session) -> None:
    result = session.call()
    session.sent.get(timeout=TIMEOUT)
    session.on_loop(session.helpers.client_done)
    with pytest.raises(Trap) as trap:
        result.result(TIMEOUT)
    assert trap.value.kind is TrapKind.HELPER_ERROR
    assert "closed its side" in trap.value.message
