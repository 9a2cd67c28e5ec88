"""`ExecuteBatch` (docs/batch.md): one function over a stream of inputs, through a real
server on a free localhost port, with `Client.execute_batch` and its asyncio twin."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from array import array
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from support import SPIN, wait_until

from bpfexec._pb.bpfexec.v1 import executor_pb2 as pb
from bpfexec._pb.bpfexec.v1 import executor_pb2_grpc as pb_grpc
from bpfexec.client.aio import AsyncClient
from bpfexec.client.client import Client, batch_input_index
from bpfexec.client.errors import DeadlineExceeded, InvalidArgument, NotFound
from bpfexec.client.types import Result as ClientResult
from bpfexec.server.app import RunningServer, serve_in_thread
from bpfexec.server.service import MAX_BATCH_INPUTS_PER_MESSAGE
from bpfexec.server.settings import Settings
from bpfexec.vm.batch import run_batch
from bpfexec.vm.helpers import HelperRegistry
from bpfexec.vm.loader import load

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "tests" / "fixtures" / "obj" / "example-O2.o"  # example(a, b): a > 3 ? b : 5
COUNTER = ROOT / "tests" / "fixtures" / "maps" / "counter.o"  # count(key): ++counts[key]
LOAD = b"r0 = *(u8 *)(r1 + 0)\nexit\n"  # a buffer's first byte; MEMORY_FAULT for an integer
TIMEOUT = 30.0
STOP_BUDGET = 1.0  # seconds from a cancellation or deadline to the worker having stopped


@pytest.fixture(scope="module", params=["interpreter", "jit"])
def server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    settings = Settings(port=0, metrics_port=0, entry_point_helpers=False, engine=request.param)
    with serve_in_thread(settings) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[Client]:
    with Client(server.address, timeout=TIMEOUT) as connected:
        yield connected


def in_flight(server: RunningServer) -> float:
    return server.metrics.registry.get_sample_value("bpfexec_executions_in_flight") or 0.0


def test_results_come_in_order_as_a_local_batch_gives_them(client: Client) -> None:
    inputs = [(n % 8, n) for n in range(10_000)]
    module = client.load(EXAMPLE.read_bytes(), "example.o")
    remote = list(client.execute_batch(module, "example", iter(inputs)))
    local = run_batch(load(EXAMPLE.read_bytes()), "example", inputs)
    assert [(r.return_value, r.fuel_used, r.trap) for r in remote] == [
        (r.return_value, r.fuel_used, r.trap) for r in local
    ]


def test_a_trap_in_the_middle_is_that_inputs_result(client: Client) -> None:
    module = client.load(LOAD)
    results = list(client.execute_batch(module, None, [[b"\x07"], [0], [b"\x09"]]))
    assert [r.return_value for r in (results[0], results[2])] == [7, 9]
    assert results[1].trap is not None and results[1].trap.kind == "MEMORY_FAULT"
    assert results[0].buffers == (b"\x07",)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([1, 2, 3, 4, 5, 6], "input 3: at most 5 arguments"),  # refused by the server
        ([1 << 64], "input 3: argument 1: 18446744073709551616 does not fit in 64 bits"),
    ],
)
def test_an_input_that_cannot_run_is_invalid_argument_naming_it(
    client: Client, bad: list[int], message: str
) -> None:
    module = client.load(EXAMPLE.read_bytes(), "example.o")
    taken = []
    with pytest.raises(InvalidArgument, match=message) as refused:
        for result in client.execute_batch(module, "example", [[4, 1], [4, 2], bad, [4, 3]]):
            taken.append(result.return_value)
    assert taken == [1, 2]  # the results before it
    assert batch_input_index(refused.value) == 2


def test_the_first_message_must_carry_the_header(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ExecutorStub(channel)
        calls = stub.ExecuteBatch(iter([pb.ExecuteBatchRequest()]), timeout=TIMEOUT)
        with pytest.raises(grpc.RpcError) as failed:
            list(calls)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must carry the `header`" in failed.value.details()


def test_a_request_message_carries_a_bounded_number_of_inputs(
    server: RunningServer, client: Client
) -> None:
    module = client.load(EXAMPLE.read_bytes(), "example.o")
    header = pb.BatchHeader(module_id=module.id, function="example")
    inputs = [pb.BatchInput(args=[pb.Argument(value=1)])] * (MAX_BATCH_INPUTS_PER_MESSAGE + 1)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ExecutorStub(channel)
        request = pb.ExecuteBatchRequest(header=header, inputs=inputs)
        with pytest.raises(grpc.RpcError) as failed:
            list(stub.ExecuteBatch(iter([request]), timeout=TIMEOUT))
    assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_batch_inputs_per_message" in failed.value.details()


def test_a_batch_on_a_state_shares_and_keeps_its_maps(client: Client) -> None:
    module = client.load(COUNTER.read_bytes(), "counter.o")
    first = client.execute_batch(module, "count", [[7], [7], [3], [7]], state="batch")
    assert [r.return_value for r in first] == [1, 2, 1, 3]
    again = client.execute_batch(module, "count", [[7], [3]], state="batch")
    assert [r.return_value for r in again] == [4, 2]
    assert [r.return_value for r in client.execute_batch(module, "count", [[7]])] == [1]


def endless_spin() -> Iterator[list[int]]:
    return itertools.repeat([])


def test_the_deadline_stops_an_endless_batch(server: RunningServer, client: Client) -> None:
    module = client.load(SPIN.encode())
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        list(client.execute_batch(module, None, endless_spin(), fuel=10**10, timeout=0.5))
    assert time.monotonic() - start < 0.5 + STOP_BUDGET
    wait_until(lambda: in_flight(server) == 0, STOP_BUDGET, "the batch's worker stopping")


def test_cancelling_the_call_stops_an_endless_batch(server: RunningServer) -> None:
    async def main() -> float:
        async with AsyncClient(server.address, timeout=TIMEOUT) as bpf:
            module = await bpf.load(SPIN.encode())

            async def inputs() -> AsyncIterator[list[int]]:
                while True:
                    yield []

            async def drain() -> None:
                async for _ in bpf.execute_batch(module, None, inputs(), fuel=10**10):
                    pass

            task = asyncio.ensure_future(drain())
            await asyncio.sleep(0.3)
            assert in_flight(server) == 1  # the batch runs its first input
            task.cancel()
            cancelled = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await task
            return cancelled

    cancelled = asyncio.run(main())
    wait_until(lambda: in_flight(server) == 0, STOP_BUDGET, "the batch's worker stopping")
    assert time.monotonic() - cancelled < STOP_BUDGET


def test_the_async_client_takes_a_plain_iterable(server: RunningServer) -> None:
    async def main() -> list[int]:
        async with AsyncClient(server.address, timeout=TIMEOUT) as bpf:
            module = await bpf.load(EXAMPLE.read_bytes(), "example.o")
            batch = bpf.execute_batch(module, "example", ((4, n) for n in range(3000)))
            return [result.return_value async for result in batch]

    assert asyncio.run(main()) == list(range(3000))


def test_a_client_that_stops_reading_stops_the_server(
    server: RunningServer, client: Client
) -> None:
    """The inputs the server takes, and the results it produces, stop growing while
    the client reads nothing: the worker blocks instead of the server buffering.
    Each result carries its 4 KiB buffer back, so HTTP/2's windows fill soon."""
    module = client.load(LOAD)
    sent = itertools.count()
    buffer = bytes(4096)

    def endless() -> Iterator[list[bytes]]:
        for _ in sent:
            yield [buffer]

    def produced() -> float:
        return server.metrics.registry.get_sample_value("bpfexec_batch_results_total") or 0.0

    before = produced()
    results = client.execute_batch(module, None, endless())
    assert next(results).return_value == 0
    time.sleep(1.0)  # the windows and queues fill, then everything stops
    first = (next(sent), produced() - before)
    time.sleep(0.5)
    second = (next(sent) - 1, produced() - before)  # (next(sent) itself takes one)
    assert second == first
    assert first[1] * len(buffer) < 64 << 20  # windows and queues, nothing unbounded
    assert in_flight(server) == 1  # the worker is parked, not finished
    results.close()  # cancels the call
    wait_until(lambda: in_flight(server) == 0, STOP_BUDGET, "the batch's worker stopping")


def test_a_batch_answers_as_an_execute_an_input_does(client: Client) -> None:
    """Speed is bench/bench_batch.py's to measure; here, the same answers."""
    module = client.load(EXAMPLE.read_bytes(), "example.o")
    inputs = [(n % 8, n) for n in range(500)]
    batched = [
        (r.return_value, r.fuel_used) for r in client.execute_batch(module, "example", inputs)
    ]
    unary = [
        (r.return_value, r.fuel_used)
        for r in (client.execute(module, "example", a) for a in inputs)
    ]
    assert batched == unary


def test_concurrent_batches_each_take_one_slot(server: RunningServer, client: Client) -> None:
    module = client.load(EXAMPLE.read_bytes(), "example.o")
    answers: list[list[int]] = []

    def one(k: int) -> None:
        batch = client.execute_batch(module, "example", ((4, k * 1000 + n) for n in range(1000)))
        answers.append([r.return_value for r in batch])

    threads = [threading.Thread(target=one, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert sorted(answers) == [list(range(k * 1000, k * 1000 + 1000)) for k in range(4)]


# -- packed inputs and results (integer inputs, without a message each) ----------------------

# Logs "hi" with bpf_trace_printk (helper 6), then returns r6, the first argument.
PRINTK = b"""
    r6 = r1
    r1 = 0x6968
    *(u64 *)(r10 - 8) = r1
    r1 = r10
    r1 += -8
    r2 = 3
    call 6
    r0 = r6
    exit
"""


def test_mixed_inputs_keep_their_order_and_traps_their_details(client: Client) -> None:
    module = client.load(LOAD)
    inputs: list[list[int | bytes]] = [[b"\x07"], [0], [5], [-1], [b"\x09"], [3, 4]] * 700
    remote = list(client.execute_batch(module, None, inputs))
    local = list(run_batch(load(LOAD), None, inputs))
    assert len(remote) == len(inputs)
    for got, want in zip(remote, local, strict=True):
        assert (got.return_value, got.fuel_used, got.buffers) == (
            want.return_value, want.fuel_used, want.buffers,
        )  # fmt: skip
        assert (got.trap is None) == (want.trap is None)
        if got.trap is not None and want.trap is not None:
            assert (got.trap.kind, got.trap.message, got.trap.pc) == (
                want.trap.kind.value, want.trap.message, want.trap.pc,
            )  # fmt: skip


def packed_call(
    server: RunningServer, module_id: str, words: bytes
) -> list[pb.ExecuteBatchResponse]:
    header = pb.BatchHeader(module_id=module_id)
    request = pb.ExecuteBatchRequest(header=header, packed=pb.PackedInputs(words=words))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ExecutorStub(channel)
        return list(stub.ExecuteBatch(iter([request]), timeout=TIMEOUT))


def test_packed_inputs_are_answered_packed(server: RunningServer, client: Client) -> None:
    module = client.load(LOAD)
    words = array("Q", [0, 0, 0, 0, 0, 5, 0, 0, 0, 0]).tobytes()
    responses = packed_call(server, module.id, words)
    packed = [r.packed for r in responses if r.HasField("packed")]
    assert len(packed) == 1 and not any(r.results for r in responses) and responses[-1].done
    results = array("Q")
    results.frombytes(packed[0].words)
    assert results.tolist() == [0, 2, 1, 0, 2, 2]  # r0, fuel used, trap 1; r0, fuel used, trap 2
    assert [t.message for t in packed[0].traps] == [
        "read of 1 bytes at 0x0 (unmapped address)", "read of 1 bytes at 0x5 (unmapped address)",
    ]  # fmt: skip
    assert [t.pc for t in packed[0].traps] == [0, 0]


def test_packed_results_carry_their_logs(client: Client) -> None:
    module = client.load(PRINTK)
    results = list(client.execute_batch(module, None, [[n] for n in range(3)]))
    assert [(r.return_value, r.log) for r in results] == [(n, ("hi",)) for n in range(3)]


def test_packed_inputs_must_be_whole_inputs(server: RunningServer, client: Client) -> None:
    module = client.load(LOAD)
    with pytest.raises(grpc.RpcError) as failed:
        packed_call(server, module.id, bytes(41))
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 2: packed inputs of 41 bytes" in failed.value.details()


def test_an_evicted_module_is_uploaded_again(server: RunningServer, client: Client) -> None:
    module = client.load(EXAMPLE.read_bytes(), "example.o")
    client.delete_module(module)  # as the cache's eviction would
    assert [r.return_value for r in client.execute_batch(module, "example", [[4, 9]])] == [9]
    client.delete_module(module)
    with pytest.raises(NotFound):  # an id alone cannot be uploaded again
        list(client.execute_batch(module.id, "example", [[4, 9]]))

    async def main() -> list[int]:
        async with AsyncClient(server.address, timeout=TIMEOUT) as bpf:
            return [r.return_value async for r in bpf.execute_batch(module, "example", [[4, 8]])]

    assert asyncio.run(main()) == [8]


# -- remote helpers in a batch ---------------------------------------------------------------

# r0 = peek(r1, r2), helper 100, answered by the client; 3 * r1 without it when r2 is 0.
PEEK = b"if r2 == 0 goto plain\ncall 100\nexit\nplain:\nr0 = r1\nr0 *= 3\nexit\n"


def peek(ctx, addr: int, size: int, *_: int) -> int:  # type: ignore[no-untyped-def]
    """Reads `size` bytes at `addr` (logging them, marking the first), or triples `addr`."""
    if not size:
        return addr * 3
    data = ctx.read(addr, size)
    ctx.log(f"peek {data.hex()}")
    ctx.write(addr, b"!")
    return sum(data)


def peek_inputs() -> list[list[int | bytes]]:
    inputs: list[list[int | bytes]] = []
    for n in range(30_000):  # beyond the window: the sender waits for results
        inputs.append([b"ab%d" % n, 3] if n % 500 == 0 else [5, 4] if n % 777 == 0 else [n, 0])
    return inputs


def assert_peeked(remote: list[ClientResult], inputs: list[list[int | bytes]]) -> None:
    """`remote` is what the same batch gives locally, with the helper in-process."""
    registry = HelperRegistry()
    registry.register(peek, id=100)
    local = list(run_batch(load(PEEK), None, inputs, helpers=registry))
    assert len(remote) == len(inputs)
    for got, want in zip(remote, local, strict=True):
        assert (got.return_value, got.fuel_used, got.log, got.buffers) == (
            want.return_value, want.fuel_used, want.log, want.buffers,
        )  # fmt: skip
        assert (got.trap and got.trap.kind) == (want.trap and want.trap.kind.value)
    assert remote[500].buffers == (b"!b500",) and remote[777].trap is not None


def test_remote_helpers_answer_a_batch_in_order(client: Client) -> None:
    module = client.load(PEEK)
    inputs = peek_inputs()
    assert_peeked(
        list(client.execute_batch(module, None, iter(inputs), helpers={100: peek})), inputs
    )


def test_the_async_client_answers_helpers_in_a_batch(server: RunningServer) -> None:
    async def apeek(call, addr: int, size: int, *_: int) -> int:  # type: ignore[no-untyped-def]
        if not size:
            return addr * 3
        data = await call.read(addr, size)
        call.log(f"peek {data.hex()}")
        await call.write(addr, b"!")
        return sum(data)

    inputs = peek_inputs()

    async def main() -> list[ClientResult]:
        async with AsyncClient(server.address, timeout=TIMEOUT) as bpf:
            module = await bpf.load(PEEK)
            batch = bpf.execute_batch(module, None, inputs, helpers={100: apeek})
            return [result async for result in batch]

    assert_peeked(asyncio.run(main()), inputs)


def test_a_batch_offering_helpers_refuses_a_client_too_far_ahead(
    server: RunningServer, client: Client
) -> None:
    module = client.load(PEEK)
    header = pb.BatchHeader(module_id=module.id, helper_numbers=[100])
    words = array("Q", [1, 8, 0, 0, 0] * 4096).tobytes()  # r2 != 0: every input calls 100
    requests = [pb.ExecuteBatchRequest(header=header)]
    requests += [pb.ExecuteBatchRequest(packed=pb.PackedInputs(words=words))] * 4
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ExecutorStub(channel)
        calls = stub.ExecuteBatch(iter(requests), timeout=TIMEOUT)  # never answers a call
        with pytest.raises(grpc.RpcError) as failed:
            for message in calls:
                assert message.WhichOneof("message") in (None, "helper_call")
    assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "keeps at most 8192 ahead" in failed.value.details()


def test_an_async_batch_with_helpers_stopped_early_ends_its_call(server: RunningServer) -> None:
    async def main() -> list[int]:
        async with AsyncClient(server.address, timeout=TIMEOUT) as bpf:
            module = await bpf.load(PEEK)
            batch = bpf.execute_batch(module, None, ([n, 0] for n in itertools.count()),
                                      helpers={100: peek})  # fmt: skip
            taken = []
            async for result in batch:
                taken.append(result.return_value)
                if len(taken) == 3:
                    break
            await batch.aclose()  # type: ignore[attr-defined]
            # The call ends now, not when the loop shuts its generators down.
            deadline = time.monotonic() + STOP_BUDGET * 5
            while in_flight(server) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert in_flight(server) == 0
            return taken

    assert asyncio.run(main()) == [0, 3, 6]
