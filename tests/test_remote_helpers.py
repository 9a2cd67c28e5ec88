"""Remote helpers end to end: a real server on localhost, helpers answered by the test
process over ExecuteStream (the Python clients, and a raw stub for protocol violations).

Every wait is bounded: the server answers a silent client after `HELPER_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from seed_helpers import registry as seed_registry
from support import SPIN, free_port, wait_until
from test_server import sample, scrape

from bpfexec._pb.bpfexec.v1 import executor_pb2 as pb
from bpfexec._pb.bpfexec.v1 import executor_pb2_grpc as pb_grpc
from bpfexec.client.aio import AsyncClient
from bpfexec.client.cli_remote import run_remote
from bpfexec.client.client import Client, HelperCall
from bpfexec.client.errors import InvalidArgument, MemoryFault
from bpfexec.server.app import RunningServer, serve_in_thread
from bpfexec.server.settings import Settings
from bpfexec.vm import Limits

TIMEOUT = 10.0
HELPER_TIMEOUT = 0.5
BUFFER0 = 0x4_0000_0000  # address of argument buffer 0

# Calls helper #100 with the buffer in r1, then returns the buffer's first u64.
FILL_BUFFER = b"r6 = r1\ncall 100\nr0 = *(u64 *)(r6 + 0)\nexit\n"
# Calls #100 once, then runs about 300k instructions: long enough to misbehave in.
CALL_THEN_LOOP = b"call 100\nr0 = 0\nloop:\nr0 += 1\nif r0 < 100000 goto loop\nexit\n"
# Still running when a late message arrives, even as native code.
CALL_THEN_SPIN = f"call 100\n{SPIN}".encode()
CALL_TWICE = b"call 100\nr6 = r0\ncall 100\nr0 += r6\nexit\n"


def seed_max(call: HelperCall, a: int, b: int, *_: int) -> int:
    return max(a, b)


def seed_mul(call: HelperCall, a: int, b: int, *_: int) -> int:
    return a * b


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    config = Settings(
        port=0,
        metrics_port=free_port(),
        entry_point_helpers=False,
        max_concurrent_executions=32,
        remote_helper_timeout=HELPER_TIMEOUT,
    )
    with serve_in_thread(config) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[Client]:
    with Client(server.address, timeout=TIMEOUT) as c:
        yield c


def in_flight(server: RunningServer) -> float:
    return sample(scrape(server), "bpfexec_executions_in_flight")


# The seed's helper programs, helpers answered by the client


@pytest.mark.parametrize(
    ("name", "helpers"),
    [
        ("helper_pointers", {1: seed_max, 42: seed_mul}),  # by number
        ("helper_prototypes", {"max": seed_max, "mul": seed_mul}),  # by name
        ("helper_pointers", seed_registry),  # a bpfexec.vm.HelperRegistry: number and name
        ("helper_prototypes", seed_registry),
    ],
)
@pytest.mark.parametrize(("args", "expected"), [((7, 3), 7), ((7, 9), 9), ((2, 3), 106)])
def test_seed_helper_programs(client: Client, compile_c, name, helpers, args, expected) -> None:
    module = client.load(compile_c(name).read_bytes(), f"{name}.o")
    result = client.execute(module, "foo", args, helpers=helpers)
    assert (result.return_value, result.trap) == (expected, None)


def test_a_helper_reads_a_string_from_vm_memory(client: Client, compile_c) -> None:
    seen: list[HelperCall] = []

    def print_(call: HelperCall, s: int, *_: int) -> int:
        seen.append(call)
        text = call.read_cstring(s, 64).decode()
        call.log(text)
        return len(text)

    module = client.load(compile_c("strings").read_bytes())
    result = client.execute(module, "hello", helpers={"print": print_})
    assert result.trap is None
    assert result.log == ("hello from eBPF", "second line")
    assert result.return_value == len("second line") + 1
    assert [(call.call_id, call.helper) for call in seen] == [(1, "print"), (2, "print")]


def test_a_helper_writes_a_result_buffer(client: Client) -> None:
    def fill(call: HelperCall, buf: int, *_: int) -> int:
        assert (buf, call.read(buf, 8)) == (BUFFER0, bytes(8))
        call.write(buf, (0x1122334455667788).to_bytes(8, "little"))
        return 0

    result = client.execute(client.load(FILL_BUFFER), args=[bytes(8)], helpers={100: fill})
    assert result.trap is None
    assert result.return_value == 0x1122334455667788
    assert result.buffers == ((0x1122334455667788).to_bytes(8, "little"),)


@pytest.mark.parametrize(
    ("helper", "trap_kind", "message"),
    [
        (lambda call, *r: 1 // 0, "HELPER_ERROR", "remote helper #100 failed: ZeroDivisionError"),
        (lambda call, *r: "seven", "HELPER_ERROR", "returned str, expected int"),
        (lambda call, *r: call.read(0, 8), "MEMORY_FAULT", "unmapped address"),
        (lambda call, *r: call.write(0x1_0000_0000, b"x"), "MEMORY_FAULT", "0x100000000"),
        (lambda call, *r: time.sleep(HELPER_TIMEOUT * 3), "HELPER_ERROR", "did not answer"),
    ],
    ids=["exception", "not-an-int", "read-fault", "write-fault", "timeout"],
)
def test_helper_failures_are_traps(client: Client, helper, trap_kind, message) -> None:
    result = client.execute(client.load(FILL_BUFFER), args=[bytes(8)], helpers={100: helper})
    assert result.trap is not None
    assert (result.trap.kind, result.trap.instruction) == (trap_kind, "call 100")
    assert message in result.trap.message


def test_a_helper_may_recover_from_a_memory_fault(client: Client) -> None:
    def probe(call: HelperCall, *_: int) -> int:
        try:
            call.read(0, 8)
        except MemoryFault as fault:
            assert "unmapped" in str(fault)
            return 5
        return 0

    result = client.execute(client.load(FILL_BUFFER), args=[bytes(8)], helpers={100: probe})
    assert (result.trap, result.return_value) == (None, 0)  # r0 = the buffer, untouched


@pytest.mark.parametrize(
    ("helpers", "message"),
    [
        ({}, "unknown helper: #100"),
        ({101: seed_max}, "unknown helper: #100"),
        ({100: seed_max, 6: seed_max}, "#6: answered in-process"),  # bpf_trace_printk
        ({100: seed_max, "bpf_trace_printk": seed_max}, "may not shadow"),
    ],
)
def test_missing_or_shadowing_helpers_are_refused(client: Client, helpers, message) -> None:
    module = client.load(FILL_BUFFER)
    with pytest.raises(InvalidArgument, match=message):
        client.execute(module, args=[bytes(8)], helpers=helpers)


def test_twenty_concurrent_streams(server: RunningServer, client: Client, compile_c) -> None:
    module = client.load(compile_c("helper_prototypes").read_bytes())

    def run(n: int) -> int:
        helpers = {"max": seed_max, "mul": seed_mul}
        return client.execute(module, "foo", [2, n], helpers=helpers).return_value

    with ThreadPoolExecutor(20) as pool:
        assert list(pool.map(run, range(20), timeout=TIMEOUT)) == [100 + 2 * n for n in range(20)]
    wait_until(lambda: in_flight(server) == 0)


def test_remote_calls_are_counted_and_timed(server: RunningServer, client: Client) -> None:
    before = scrape(server)
    client.execute(client.load(CALL_TWICE), helpers={100: lambda call, *r: 20})
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("bpfexec_helper_calls_total", helper="#100", location="remote") == 2
    assert delta("bpfexec_remote_helper_seconds_count") == 2


def test_async_client_with_async_and_plain_helpers(server: RunningServer, compile_c) -> None:
    async def print_(call, s: int, *_: int) -> int:
        call.log((await call.read_cstring(s)).decode())
        return 1

    async def main() -> tuple:
        async with AsyncClient(server.address, timeout=TIMEOUT) as bpf:
            strings = await bpf.load(compile_c("strings").read_bytes())
            seed = await bpf.load(compile_c("helper_prototypes").read_bytes())
            return (
                await bpf.execute(strings, "hello", helpers={"print": print_}),
                await bpf.execute(seed, "foo", [2, 3], helpers={"max": seed_max, "mul": seed_mul}),
                await bpf.execute(seed, "foo", [2, 3], helpers={"max": seed_max, "mul": None}),
            )

    strings, seed, broken = asyncio.run(main())
    assert (strings.log, strings.return_value) == (("hello from eBPF", "second line"), 2)
    assert (seed.return_value, seed.trap) == (106, None)
    assert broken.trap is not None and "TypeError" in broken.trap.message


def test_cli_remote_helpers(server: RunningServer, compile_c) -> None:
    code = compile_c("helper_pointers").read_bytes()
    result = run_remote(
        code, "helper_pointers.o", server.address, "foo", [2, 3], None,
        remote_helpers=["seed_helpers:registry"],
    )  # fmt: skip
    assert (result["return_value"], result["trap"]) == (106, None)


# Misbehaving clients, driven message by message through a raw stub


class RawStream:
    """An ExecuteStream whose requests the test sends one by one."""

    def __init__(self, server: RunningServer) -> None:
        self.channel = grpc.insecure_channel(server.address)
        self.outbox: queue.SimpleQueue[pb.ExecuteStreamRequest | None] = queue.SimpleQueue()
        stub = pb_grpc.ExecutorStub(self.channel)
        self.responses = stub.ExecuteStream(iter(self.outbox.get, None), timeout=TIMEOUT)

    def send(self, **message: object) -> None:
        self.outbox.put(pb.ExecuteStreamRequest(**message))

    def receive(self) -> pb.ExecuteStreamResponse:
        return next(self.responses)

    def close(self) -> None:
        self.outbox.put(None)
        self.responses.cancel()
        self.channel.close()


def start(
    module_id: str, numbers: tuple[int, ...] = (100,), fuel: int = 10**7
) -> dict[str, object]:
    request = pb.ExecuteRequest(module_id=module_id, fuel=fuel)
    return {"start": pb.ExecuteStart(request=request, helper_numbers=numbers)}


def result(call_id: int, value: int = 0) -> dict[str, object]:
    return {"helper_result": pb.HelperResult(call_id=call_id, value=value)}


VIOLATIONS = {
    "result-first": ([result(1)], "first message of ExecuteStream must be `start`"),
    "second-start": (["start"], "unexpected a `start` message"),
    "wrong-call-id": ([result(7)], "call_id 7, but the pending helper call is 1"),
    "empty-result": (
        [{"helper_result": pb.HelperResult(call_id=1)}],
        "sets neither value nor error",
    ),
    "twice-answered": ([result(1), result(1)], "call_id 1, but no helper call is pending"),
    "memory-outside-a-call": (
        [result(1), {"memory_read": pb.MemoryRead(call_id=1, address=BUFFER0, size=1)}],
        "MemoryRead for call_id 1, but no helper call is pending",
    ),
}


@pytest.mark.parametrize("case", list(VIOLATIONS))
def test_protocol_violations_end_the_stream(server: RunningServer, client: Client, case) -> None:
    messages, expected = VIOLATIONS[case]
    module = client.load(CALL_THEN_SPIN)
    fuel = Limits().max_fuel  # the program is still running when the violation arrives
    stream = RawStream(server)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            if case != "result-first":
                stream.send(**start(module.id, fuel=fuel))
                assert stream.receive().helper_call.call_id == 1
            for message in messages:
                stream.send(**(start(module.id, fuel=fuel) if message == "start" else message))
            while True:  # whatever the server still sends, the stream must end in error
                stream.receive()
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert expected in caught.value.details()
    finally:
        stream.close()
    wait_until(lambda: in_flight(server) == 0)


def test_a_late_answer_after_a_timeout_is_ignored(server: RunningServer, client: Client) -> None:
    module = client.load(CALL_THEN_LOOP)
    stream = RawStream(server)
    try:
        stream.send(**start(module.id))
        assert stream.receive().helper_call.call_id == 1
        time.sleep(HELPER_TIMEOUT * 2)
        stream.send(**result(1))
        final = stream.receive().result
        assert final.trap.kind == "HELPER_ERROR" and "did not answer" in final.trap.message
    finally:
        stream.close()


def test_a_client_that_disconnects_mid_call_frees_everything(
    server: RunningServer, client: Client
) -> None:
    module = client.load(CALL_THEN_LOOP)
    stream = RawStream(server)
    stream.send(**start(module.id))
    assert stream.receive().helper_call.call_id == 1
    assert in_flight(server) == 1
    gone = time.monotonic()
    stream.close()  # cancels the RPC: the server sees the client go away
    wait_until(lambda: in_flight(server) == 0, timeout=1.0)
    assert time.monotonic() - gone < 1.0
    samples = scrape(server)
    assert sample(samples, "bpfexec_executions_total", outcome="CANCELLED") >= 1
    # Healthy afterwards: the next stream works.
    assert client.execute(module, helpers={100: lambda call, *r: 0}).trap is None


def test_a_client_that_half_closes_gets_a_helper_error(
    server: RunningServer, client: Client
) -> None:
    module = client.load(CALL_TWICE)
    stream = RawStream(server)
    try:
        stream.send(**start(module.id))
        assert stream.receive().helper_call.call_id == 1
        stream.send(**result(1, 5))
        assert stream.receive().helper_call.call_id == 2
        stream.outbox.put(None)  # half-close: call 2 can never be answered
        final = stream.receive().result
        assert final.trap.kind == "HELPER_ERROR"
        assert "closed its side" in final.trap.message
    finally:
        stream.close()


def test_settings_reject_a_non_positive_remote_helper_timeout() -> None:
    with pytest.raises(ValueError, match="remote_helper_timeout"):
        dataclasses.replace(Settings(), remote_helper_timeout=0)


def test_remote_helper_timeout_from_the_environment() -> None:
    settings = Settings.from_args(None, {"BPFEXEC_REMOTE_HELPER_TIMEOUT": "2.5"})
    assert settings.remote_helper_timeout == 2.5
