"""Execute throughput and latency next to the transport's own ceiling.

    python bench/bench_execute.py [--seconds 3] [--concurrency 1 4 16]

Two servers run in their own processes: the real bpfexec server, and a minimal
grpc.aio server with one empty unary method (a generic handler on raw bytes,
so no proto is needed): what gRPC in Python costs before any work is done.
This process drives both with the same asyncio client at each concurrency
level, alternating short slices between them, and prints a markdown table.
Goal: Execute >= 70% of the ceiling's throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection

import grpc

from bpfexec._pb.bpfexec.v1 import executor_pb2 as pb
from bpfexec._pb.bpfexec.v1 import executor_pb2_grpc as pb_grpc

PROGRAM = b"r0 = r1\nr0 += 1\nexit\n"
PING = "/bench.Ping/Ping"
ROUNDS = 6  # slices per measurement, alternating between the two servers


def _serve_bpfexec(ready: Connection) -> None:
    from bpfexec.server.app import start
    from bpfexec.server.settings import Settings

    async def main() -> None:
        running = await start(Settings(port=0, metrics_port=0, max_concurrent_executions=64))
        ready.send(running.port)
        await asyncio.Event().wait()

    asyncio.run(main())


def _serve_ping(ready: Connection) -> None:
    async def ping(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b""

    async def main() -> None:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(ping)  # no (de)serializers: raw bytes
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("bench.Ping", {"Ping": handler})]
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready.send(port)
        await server.wait_for_termination()

    asyncio.run(main())


def start_process(target: Callable[[Connection], None]) -> tuple[multiprocessing.Process, int]:
    receive, send = multiprocessing.Pipe(duplex=False)
    process = multiprocessing.Process(target=target, args=(send,), daemon=True)
    process.start()
    if not receive.poll(30):
        raise RuntimeError(f"{target.__name__} did not start")
    return process, int(receive.recv())


class Calls:
    """Latencies of calls made with a fixed number always in flight, over several slices."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.seconds = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile_ms(self, q: int) -> float:
        return statistics.quantiles(self.latencies, n=100)[q - 1] * 1e3

    async def drive(
        self, call: Callable[[], Awaitable[object]], concurrency: int, seconds: float
    ) -> None:
        for _ in range(concurrency * 5):  # warm up: connection, caches, code paths
            await call()
        start = time.perf_counter()
        stop = start + seconds

        async def worker() -> None:
            while (now := time.perf_counter()) < stop:
                await call()
                self.latencies.append(time.perf_counter() - now)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        self.seconds += time.perf_counter() - start


async def measure(
    execute_port: int, ping_port: int, levels: list[int], seconds: float
) -> list[tuple[int, Calls, Calls]]:
    rows = []
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{execute_port}") as bpf_channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{ping_port}") as ping_channel,
    ):
        stub = pb_grpc.ExecutorStub(bpf_channel)
        module = await stub.LoadModule(pb.LoadModuleRequest(code=PROGRAM, name="add_one"))
        request = pb.ExecuteRequest(module_id=module.id, args=[pb.Argument(value=41)])
        reply = await stub.Execute(request)
        assert reply.return_value == 42 and not reply.trap.kind, reply
        ping = ping_channel.unary_unary(PING)

        for level in levels:
            # Alternate short slices, so load from elsewhere on the machine hits
            # both sides alike instead of skewing one whole measurement.
            execute_calls, ping_calls = Calls(), Calls()
            for _ in range(ROUNDS):
                await execute_calls.drive(lambda: stub.Execute(request), level, seconds / ROUNDS)
                await ping_calls.drive(lambda: ping(b""), level, seconds / ROUNDS)
            rows.append((level, execute_calls, ping_calls))
    return rows


def table(rows: list[tuple[int, Calls, Calls]]) -> str:
    lines = [
        "| concurrency | Execute calls/s | ceiling calls/s | ratio "
        "| Execute p50 / p99 ms | ceiling p50 / p99 ms |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for level, execute, ping in rows:
        lines.append(
            f"| {level} | {execute.rate:,.0f} | {ping.rate:,.0f} | {execute.rate / ping.rate:.0%} "
            f"| {execute.percentile_ms(50):.3f} / {execute.percentile_ms(99):.3f} "
            f"| {ping.percentile_ms(50):.3f} / {ping.percentile_ms(99):.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()

    bpfexec, execute_port = start_process(_serve_bpfexec)
    pinger, ping_port = start_process(_serve_ping)
    try:
        rows = asyncio.run(measure(execute_port, ping_port, args.concurrency, args.seconds))
    finally:
        for process in (bpfexec, pinger):
            process.terminate()
            process.join(5)
    print(f"Execute of a 3-instruction program vs an empty unary call, {args.seconds:g} s each\n")
    print(table(rows))


if __name__ == "__main__":
    main()
