"""What one ExecuteStream may cost the server: memory reads are capped and run off
the event loop, and the answers queued for a client that does not read them are
bounded (the server stops reading that client instead). Against `bpfexec serve`
in a subprocess on 127.0.0.1 (tests/server_process.py), so its resident memory is
its own and read from /proc; health checks go over their own connection meanwhile.

Every test is bounded in count and time (a few seconds each).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_process import ServerProcess
from support import wait_until

from bpfexec._pb.bpfexec.v1 import executor_pb2 as pb
from bpfexec._pb.bpfexec.v1 import executor_pb2_grpc as pb_grpc
from bpfexec.client.client import Client, HelperCall
from bpfexec.client.errors import MemoryFault
from bpfexec.server.remote import DEFAULT_MAX_READ_BYTES, Outbox
from bpfexec.server.settings import Settings

MiB = 1 << 20
BUFFER0 = 0x4_0000_0000  # argument buffer 0
TIMEOUT = 10.0
HELPER_TIMEOUT = 2.0  # --remote-helper-timeout: how long a stuck call holds its run
HEALTH_BUDGET = 0.1  # every health check during an attack answers within this
RSS_BUDGET_MIB = 200  # growth of the server's resident memory during an attack
CALL_100 = b"call 100\nexit\n"
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * MiB),
    ("grpc.max_receive_message_length", 64 * MiB),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("stream-limits") / "server.log"
    process = ServerProcess(
        log, "--engine", "interpreter", "--remote-helper-timeout", str(HELPER_TIMEOUT)
    )
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="module")
def module_id(server: ServerProcess) -> str:
    with Client(server.address, timeout=TIMEOUT) as client:
        return client.load(CALL_100).id


class HealthProbe:
    """Health checks, one every 10 ms on a connection of their own, timed."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = health_pb2_grpc.HealthStub(self.channel)
        self.stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)  # connected
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        self.channel.close()

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.latencies) < 2000:
            start = time.perf_counter()
            try:
                reply = self.stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    self.failures.append(f"status {reply.status}")
            except grpc.RpcError as error:
                self.failures.append(str(error.code()))
            self.latencies.append(time.perf_counter() - start)
            self._stop.wait(0.01)

    def check(self) -> None:
        assert not self.failures, self.failures
        assert len(self.latencies) >= 5, "too few health checks to judge"
        worst = max(self.latencies)
        assert worst < HEALTH_BUDGET, (
            f"a health check took {worst * 1000:.1f} ms during the attack "
            f"(median {sorted(self.latencies)[len(self.latencies) // 2] * 1000:.1f} ms)"
        )


class RawStream:
    """An ExecuteStream driven message by message; it reads answers only when asked."""

    def __init__(self, server: ServerProcess, module_id: str, buffer: bytes, timeout: float):
        self.channel = grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS)
        self.requests: queue.SimpleQueue[pb.ExecuteStreamRequest | None] = queue.SimpleQueue()
        stub = pb_grpc.ExecutorStub(self.channel)
        self.responses = stub.ExecuteStream(iter(self.requests.get, None), timeout=timeout)
        request = pb.ExecuteRequest(module_id=module_id, args=[pb.Argument(buffer=buffer)])
        self.send(start=pb.ExecuteStart(request=request, helper_numbers=[100]))
        self.call_id = next(self.responses).helper_call.call_id
        assert self.call_id == 1

    def send(self, **message: object) -> None:
        self.requests.put(pb.ExecuteStreamRequest(**message))

    def read(self, size: int, until_nul: bool = False) -> None:
        read = pb.MemoryRead(call_id=self.call_id, address=BUFFER0, size=size, until_nul=until_nul)
        self.send(memory_read=read)

    def receive(self) -> pb.ExecuteStreamResponse:
        return next(self.responses)

    def close(self) -> None:
        self.requests.put(None)
        self.responses.cancel()
        self.channel.close()


def rss_mib(server: ServerProcess) -> float:
    return server.rss_kib() / 1024


def in_progress(server: ServerProcess) -> tuple[float, float]:
    return (
        server.metric("bpfexec_executions_in_flight"),
        server.metric("bpfexec_requests_in_progress"),
    )


# Item 1: a MemoryRead is capped, scans with bytes.find, and runs off the event loop


def test_a_read_beyond_the_cap_gets_a_one_line_error_and_the_run_goes_on(
    server: ServerProcess, module_id: str
) -> None:
    """The review's attack: until_nul over a 16 MiB string, which used to hold the
    event loop (every client of the server) for 8.7 s."""
    stream = RawStream(server, module_id, b"A" * (16 * MiB), timeout=TIMEOUT)
    try:
        with HealthProbe(server.address) as probe:
            time.sleep(0.1)
            start = time.perf_counter()
            stream.read(16 * MiB, until_nul=True)
            answer = stream.receive().memory_read_result
            took = time.perf_counter() - start
            time.sleep(0.1)
        assert answer.WhichOneof("outcome") == "error"
        assert answer.error == (
            f"MemoryRead of {16 * MiB} bytes exceeds the server's limit of "
            f"{DEFAULT_MAX_READ_BYTES} bytes per read (max_memory_read_bytes): "
            "read in smaller pieces"
        )
        assert took < 1.0
        probe.check()
        # Not a fault of the program's: the call is still pending, and a read at the cap works.
        stream.read(DEFAULT_MAX_READ_BYTES, until_nul=True)
        assert stream.receive().memory_read_result.data == b"A" * DEFAULT_MAX_READ_BYTES
        stream.send(helper_result=pb.HelperResult(call_id=1, value=7))
        final = stream.receive().result
        assert (final.return_value, final.trap.kind) == (7, "")
    finally:
        stream.close()


def test_reads_at_the_cap_leave_health_checks_prompt(server: ServerProcess, module_id: str) -> None:
    """1 MiB string scans (at most 400), answered and read one after another for a
    second: the event loop serves health checks within 100 ms throughout."""
    stream = RawStream(server, module_id, b"B" * (16 * MiB), timeout=TIMEOUT)
    try:
        with HealthProbe(server.address) as probe:
            end = time.monotonic() + 1.0
            for _ in range(400):
                stream.read(DEFAULT_MAX_READ_BYTES, until_nul=True)
                assert len(stream.receive().memory_read_result.data) == DEFAULT_MAX_READ_BYTES
                if time.monotonic() > end:
                    break
        probe.check()
        stream.send(helper_result=pb.HelperResult(call_id=1, value=0))
        assert stream.receive().result.trap.kind == ""
    finally:
        stream.close()


def test_the_python_client_reads_past_the_cap_in_pieces(server: ServerProcess) -> None:
    seen: list[str] = []

    def reader(call: HelperCall, buf: int, *_: int) -> int:
        try:
            call.read(buf, 2 * MiB)
        except MemoryFault as fault:
            seen.append(str(fault))
        whole = b"".join(call.read(buf + offset, MiB) for offset in range(0, 3 * MiB, MiB))
        return whole.count(b"z")

    with Client(server.address, timeout=TIMEOUT) as client:
        module = client.load(b"call 100\nexit\n")
        result = client.execute(module, args=[b"z" * (3 * MiB)], helpers={100: reader})
    assert (result.return_value, result.trap) == (3 * MiB, None)
    assert len(seen) == 1 and "max_memory_read_bytes" in seen[0] and "\n" not in seen[0]


# Item 2: the outbox is bounded; a client that does not read is not read either


@pytest.mark.parametrize(
    ("count", "size"),
    [(60, 16 * MiB), (300, MiB)],
    ids=["60-reads-of-16MiB", "300-reads-of-1MiB"],
)
def test_a_client_that_never_reads_its_answers_holds_bounded_memory(
    server: ServerProcess, module_id: str, count: int, size: int
) -> None:
    """The review's attack (sixty 20-byte requests for 16 MiB each, never reading an
    answer: 48 MiB -> 1.1 GiB), and the same with reads the cap allows: the server
    stops reading the stream once its outbox is full, so its memory stays put; the
    stuck stream is then ended by the remote helper timeout and the call's deadline."""
    deadline = HELPER_TIMEOUT + 2.0
    stream = RawStream(server, module_id, bytes(16 * MiB), timeout=deadline)
    opened = time.monotonic()
    try:
        before = rss_mib(server)
        peak = before
        with HealthProbe(server.address) as probe:
            for _ in range(count):
                stream.read(size)
            end = time.monotonic() + 1.5
            while time.monotonic() < end:
                peak = max(peak, rss_mib(server))
                time.sleep(0.05)
        probe.check()
        assert peak - before < RSS_BUDGET_MIB, f"RSS {before:.0f} -> {peak:.0f} MiB"
        # Still stuck: the run ends when its helper call times out, the call at its deadline.
        wait_until(
            lambda: in_progress(server) == (0, 0), timeout=deadline + 3.0, what="stream ended"
        )
        assert time.monotonic() - opened < deadline + 3.0
        assert rss_mib(server) - before < RSS_BUDGET_MIB
    finally:
        stream.close()
    # And the server still serves streams.
    with Client(server.address, timeout=TIMEOUT) as client:
        result = client.execute(module_id, helpers={100: lambda call, *r: 5})
    assert (result.return_value, result.trap) == (5, None)


def test_a_client_that_reads_slowly_gets_every_answer_in_order(
    server: ServerProcess, module_id: str
) -> None:
    """Backpressure loses nothing: 20 reads of 1 MiB sent at once (more than the
    outbox holds), read back one by one after a pause."""
    stream = RawStream(server, module_id, bytes(range(256)) * (4 * MiB // 256), timeout=TIMEOUT)
    try:
        for n in range(20):
            read = pb.MemoryRead(call_id=1, address=BUFFER0 + n, size=MiB)
            stream.send(memory_read=read)
        time.sleep(0.5)
        for n in range(20):
            data = stream.receive().memory_read_result.data
            assert (len(data), data[0]) == (MiB, n)
        stream.send(helper_result=pb.HelperResult(call_id=1, value=1))
        assert stream.receive().result.return_value == 1
    finally:
        stream.close()


# The pieces, without a network


def test_the_outbox_makes_a_putter_wait_for_room() -> None:
    async def main() -> list[str]:
        outbox: Outbox[str] = Outbox(max_bytes=100, max_messages=3)
        events: list[str] = []
        await outbox.put("a", 60)
        outbox.put_nowait("call")  # the protocol's own messages never wait
        waiting = asyncio.ensure_future(outbox.put("b", 60))  # 60 + 64 + 60 > 100
        await asyncio.sleep(0.01)
        events.append(f"b waiting: {not waiting.done()}, queued {outbox.queued_bytes}")
        events.append(await outbox.get())
        await asyncio.sleep(0.01)
        events.append(f"b waiting: {not waiting.done()}")  # "call" (64) + 60 still > 100
        events.append(await outbox.get())
        await asyncio.wait_for(waiting, 1.0)
        events.append(await outbox.get())
        big = asyncio.ensure_future(outbox.put("huge", 1000))  # alone, it still fits
        await asyncio.wait_for(big, 1.0)
        events.append(await outbox.get())
        for n in range(3):
            await outbox.put(str(n), 1)
        fourth = asyncio.ensure_future(outbox.put("3", 1))  # max_messages
        await asyncio.sleep(0.01)
        events.append(f"fourth waiting: {not fourth.done()}")
        await outbox.get()
        await asyncio.wait_for(fourth, 1.0)
        return events

    assert asyncio.run(main()) == [
        "b waiting: True, queued 124",
        "a",
        "b waiting: True",
        "call",
        "b",
        "huge",
        "fourth waiting: True",
    ]


def test_stream_limits_are_settings() -> None:
    defaults = Settings()
    assert (defaults.max_memory_read_bytes, defaults.max_stream_outbox_bytes) == (MiB, 2 * MiB)
    settings = Settings.from_args(
        None,
        {"BPFEXEC_MAX_MEMORY_READ_BYTES": "4096", "BPFEXEC_MAX_STREAM_OUTBOX_BYTES": "65536"},
    )
    assert (settings.max_memory_read_bytes, settings.max_stream_outbox_bytes) == (4096, 65536)
    for name in ("max_memory_read_bytes", "max_stream_outbox_bytes"):
        with pytest.raises(ValueError, match=name):
            Settings(**{name: 0})


def test_the_server_passes_the_limits_to_streams(tmp_path: Path) -> None:
    """`--max-memory-read-bytes` reaches the stream: a read of 4 KiB + 1 is refused."""
    process = ServerProcess(tmp_path / "server.log", "--max-memory-read-bytes", "4096")
    try:
        with Client(process.address, timeout=TIMEOUT) as client:
            module = client.load(CALL_100)

            def probe(call: HelperCall, buf: int, *_: int) -> int:
                assert len(call.read(buf, 4096)) == 4096
                with pytest.raises(MemoryFault, match="limit of 4096 bytes per read"):
                    call.read(buf, 4097)
                return 1

            result = client.execute(module, args=[bytes(8192)], helpers={100: probe})
        assert (result.return_value, result.trap) == (1, None)
    finally:
        process.kill()
