"""Cost of one remote helper round trip, next to the transport's floor.

    python bench/bench_remote_helpers.py [--calls N] [--repeat R]

Measurements in one run, on one machine, over localhost, interleaved R times
(the table gives the median of the R runs, and the best):

- floor: a raw ping-pong on a minimal bidirectional `grpc.aio` stream (generic
  handlers, bytes in and out, no proto): the least one round trip can cost;
- floor + thread hop: the same ping-pong, but the server hands each message to
  a thread and waits for it to hand it back (`call_soon_threadsafe` one way, a
  lock the other), as a remote helper must: the program that calls it runs on
  a worker thread, never on the event loop. What this row adds to the floor is
  the part of a remote helper's cost that no change to bpfexec removes;
- remote helper: a program calling a remote helper N times through
  `ExecuteStream`, answered by `bpfexec.client.aio.AsyncClient` (the same asyncio
  transport as the floor) and by the blocking `bpfexec.client.Client`; the
  per-call cost is (time of the run - time of the same run with N = 0) / N.

The server runs in a thread of this process (`serve_in_thread`), the floors on
their own event loop: gRPC's asyncio poller is shared by every event loop of a
process and wakes them all on each completion, so the idle server also slows
the floors down a little, and a remote helper here pays for two event loops
in one process, which a server in its own process does not.

The goal is a remote helper round trip of at most 1.5x the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from _thread import allocate_lock
from collections.abc import AsyncIterator, Callable

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


async def _pong_through_a_thread(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    """`_pong`, each message handed to a thread and back (the remote helper's two hops)."""
    loop = asyncio.get_running_loop()
    go = allocate_lock()
    go.acquire()
    handoff: list[tuple[asyncio.Future[bytes], bytes] | None] = [None]  # None: stop

    def worker() -> None:
        while go.acquire() and (pending := handoff[0]) is not None:
            future, message = pending
            loop.call_soon_threadsafe(future.set_result, message)

    threading.Thread(target=worker, daemon=True).start()
    try:
        async for request in requests:
            future: asyncio.Future[bytes] = loop.create_future()
            handoff[0] = (future, request)
            go.release()
            yield await future
    finally:
        handoff[0] = None
        go.release()


async def floor(calls: int, handler_fn: Callable[..., object] = _pong) -> float:
    """Seconds per round trip of a raw bidirectional ping-pong."""
    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(handler_fn)  # bytes in, bytes out
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
    parser.add_argument(
        "--repeat", type=int, default=5, help="measurements of each row; the median is shown"
    )
    options = parser.parse_args()
    settings = Settings(port=0, metrics_port=0, entry_point_helpers=False)
    rows: dict[str, list[float]] = {}
    with serve_in_thread(settings) as server:
        for _ in range(options.repeat):
            calls = options.calls
            measured = {
                "raw grpc.aio bidi ping-pong (floor)": asyncio.run(floor(calls)),
                "floor + thread hop (no bpfexec)": asyncio.run(
                    floor(calls, _pong_through_a_thread)
                ),
                "remote helper, AsyncClient": asyncio.run(remote_async(server.address, calls)),
                "remote helper, Client (blocking)": remote_sync(server.address, calls),
            }
            for name, seconds in measured.items():
                rows.setdefault(name, []).append(seconds)
    base = statistics.median(rows["raw grpc.aio bidi ping-pong (floor)"])
    print(f"{options.calls} round trips, median (and best) of {options.repeat}")
    print(f"| {'round trip':<38} | {'us/call':>8} | {'x floor':>7} | {'best us':>8} |")
    print(f"| {'-' * 38} | {'-' * 8}:| {'-' * 7}:| {'-' * 8}:|")
    for name, samples in rows.items():
        median = statistics.median(samples)
        print(
            f"| {name:<38} | {median * 1e6:8.1f} | {median / base:7.2f} | "
            f"{min(samples) * 1e6:8.1f} |"
        )


if __name__ == "__main__":
    main()
