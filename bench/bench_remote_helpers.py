"""Cost of one remote helper round trip, next to the transport's floor.

    python bench/bench_remote_helpers.py [--calls N] [--repeat R]

Two measurements in one run, on one machine, over localhost:

- floor: a raw ping-pong on a minimal bidirectional `grpc.aio` stream (generic
  handlers, bytes in and out, no proto): the least one round trip can cost;
- remote helper: a program calling a remote helper N times through
  `ExecuteStream`, answered by `bpfexec.client.aio.AsyncClient` (the same asyncio
  transport as the floor) and by the blocking `bpfexec.client.Client`; the
  per-call cost is (time of the run - time of the same run with N = 0) / N.

The goal is a remote helper round trip of at most 1.5x the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from bpfexec.client.aio import AsyncClient
from bpfexec.client.client import Client
from bpfexec.server.app import serve_in_thread
from bpfexec.server.settings import Settings

PING = "/bench.Ping/PingPong"

# r1 = number of calls; calls helper #100 that many times.
LOOP = b"""
r6 = r1
r7 = 0
if r6 == 0 goto done
loop:
call 100
r7 += 1
if r7 < r6 goto loop
done:
r0 = r7
exit
"""


async def _pong(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext):
    async for request in requests:
        yield request


async def floor(calls: int) -> float:
    """Seconds per round trip of a raw bidirectional ping-pong."""
    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(_pong)  # bytes in, bytes out
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("bench.Ping", {"PingPong": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = channel.stream_stream(PING)()
            for _ in range(100):  # warm up
                await stream.write(b"x" * 48)
                await stream.read()
            start = time.perf_counter()
            for _ in range(calls):
                await stream.write(b"x" * 48)  # about the size of a HelperCall
                await stream.read()
            seconds = time.perf_counter() - start
            await stream.done_writing()
        return seconds / calls
    finally:
        await server.stop(0)


async def remote_async(address: str, calls: int) -> float:
    async with AsyncClient(address, timeout=60) as bpf:
        module = await bpf.load(LOOP)
        helpers = {100: lambda call, *r: 0}

        async def run(n: int) -> float:
            start = time.perf_counter()
            result = await bpf.execute(module, args=[n], helpers=helpers, fuel=10**8)
            assert result.return_value == n, result
            return time.perf_counter() - start

        await run(100)  # warm up
        return (await run(calls) - await run(0)) / calls


def remote_sync(address: str, calls: int) -> float:
    with Client(address, timeout=60) as bpf:
        module = bpf.load(LOOP)
        helpers = {100: lambda call, *r: 0}

        def run(n: int) -> float:
            start = time.perf_counter()
            result = bpf.execute(module, args=[n], helpers=helpers, fuel=10**8)
            assert result.return_value == n, result
            return time.perf_counter() - start

        run(100)  # warm up
        return (run(calls) - run(0)) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000, help="round trips per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="measurements; the best is kept")
    options = parser.parse_args()
    settings = Settings(port=0, metrics_port=0, entry_point_helpers=False)
    rows: dict[str, float] = {}
    with serve_in_thread(settings) as server:
        for _ in range(options.repeat):
            measured = {
                "raw grpc.aio bidi ping-pong (floor)": asyncio.run(floor(options.calls)),
                "remote helper, AsyncClient": asyncio.run(
                    remote_async(server.address, options.calls)
                ),
                "remote helper, Client (blocking)": remote_sync(server.address, options.calls),
            }
            for name, seconds in measured.items():
                rows[name] = min(rows.get(name, float("inf")), seconds)
    base = rows["raw grpc.aio bidi ping-pong (floor)"]
    print(f"{options.calls} round trips, best of {options.repeat}")
    print(f"| {'round trip':<38} | {'us/call':>8} | {'x floor':>7} |")
    print(f"| {'-' * 38} | {'-' * 8}:| {'-' * 7}:|")
    for name, seconds in rows.items():
        print(f"| {name:<38} | {seconds * 1e6:8.1f} | {seconds / base:7.2f} |")


if __name__ == "__main__":
    main()
