"""Executions per second on named states: embedded versus Redis, 1 and 2 servers.

    python bench/bench_states.py [--seconds 3] [--clients 4] [--redis-server PATH]

Every row starts its own `bpfexec serve` processes on free localhost ports
(and, for the Redis rows, a `redis-server` with `appendfsync always`, as
docs/deploy.md asks of production), then `--clients` client processes, one
connection each, call `count(7)` of tests/fixtures/maps/counter.o (a hash map
update) for `--seconds` and count the answers. "one state": every execution
names the same state, so they run one at a time (docs/state.md); "a state per
client": each client its own. The rows:

- no state: the same executions on fresh maps, the ceiling;
- embedded, 1 process: the server's own states (`--workers 1`);
- embedded, `--workers 2`: two processes sharing a directory (flock leases);
- Redis, 1 and 2 replicas: `--state-store redis://` (the clients split
  between the replicas).

Then, without gRPC, what one request's hold and commit of a state costs in
the server process (`StateRegistry.hold` around one map update, the mean of
2,000): kept by the process, in the workers' directory, in Redis.

Prints two markdown tables; docs/deploy.md keeps the latest.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import grpc

from bpfexec._pb.bpfexec.v1 import executor_pb2 as pb
from bpfexec._pb.bpfexec.v1 import executor_pb2_grpc as pb_grpc
from bpfexec.server.metrics import Metrics
from bpfexec.server.state_files import StateKey
from bpfexec.server.states import StateRegistry
from bpfexec.server.states_directory import DirectoryStates
from bpfexec.server.states_redis import RedisStates
from bpfexec.vm import load

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from redis_process import RedisServer
from server_process import ROOT, ServerProcess

COUNTER = ROOT / "tests" / "fixtures" / "maps" / "counter.o"
HOLDS = 2000


def client(address: str, state: str, seconds: float) -> int:
    """Executions answered OK in `seconds`, on one connection of this process (with
    `--workers 2`: to one worker, which caches the module this connection uploads)."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ExecutorStub(channel)
        try:
            loaded = pb.LoadModuleRequest(code=COUNTER.read_bytes())
            module = stub.LoadModule(loaded, timeout=30).id
            request = pb.ExecuteRequest(
                module_id=module, function="count", args=[pb.Argument(value=7)], state=state
            )
            stub.Execute(request, timeout=30)  # warm: the state exists, the module is cached
            done = 0
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                stub.Execute(request, timeout=30)
                done += 1
        except grpc.RpcError as exc:  # not picklable: its message is
            raise RuntimeError(f"{exc.code()}: {exc.details()}") from None
        return done


def measure(addresses: list[str], states: str, clients: int, seconds: float) -> float:
    names = {"none": [""] * clients, "one": ["s"] * clients}.get(
        states, [f"s{n}" for n in range(clients)]
    )
    # spawned, not forked: this process has used gRPC already
    with ProcessPoolExecutor(clients, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [
            pool.submit(client, addresses[n % len(addresses)], names[n], seconds)
            for n in range(clients)
        ]
        return sum(job.result() for job in jobs) / seconds


def hold_cost(states: StateRegistry) -> float:
    """Microseconds one hold of a state takes, with one map update committed."""
    program = load(COUNTER.read_bytes())
    key = StateKey("", "sha256:" + "ab" * 32, "bench")
    seven = (7).to_bytes(4, "little")
    for n in range(HOLDS // 10 + HOLDS):
        if n == HOLDS // 10:
            start = time.perf_counter()  # after a warm-up
        with states.hold(key, program) as state:
            state.map("counts").update(seven, n.to_bytes(8, "little"), 0)
    return (time.perf_counter() - start) / HOLDS * 1e6


def hold_costs() -> None:
    print("\n| a state kept by | hold and commit, µs |")
    print("| --- | ---: |")
    with tempfile.TemporaryDirectory() as scratch:
        redis = RedisServer(Path(scratch))
        try:
            rows = [
                ("the process (`--workers 1`)", None),
                ("the workers' directory (`--workers N`)", DirectoryStates(Path(scratch) / "d")),
                ("Redis (`--state-store`, appendfsync always)", RedisStates(redis.url)),
            ]
            for what, shared in rows:
                cost = hold_cost(StateRegistry(metrics=Metrics(), shared=shared))
                print(f"| {what} | {cost:,.0f} |", flush=True)
        finally:
            redis.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    rows = [
        ("no state", "embedded", 1, [], "none"),
        ("one state", "embedded, 1 process", 1, [], "one"),
        ("a state per client", "embedded, 1 process", 1, [], "many"),
        ("one state", "embedded, --workers 2", 1, ["--workers", "2"], "one"),
        ("a state per client", "embedded, --workers 2", 1, ["--workers", "2"], "many"),
        ("one state", "Redis, 1 replica", 1, ["redis"], "one"),
        ("a state per client", "Redis, 1 replica", 1, ["redis"], "many"),
        ("one state", "Redis, 2 replicas", 2, ["redis"], "one"),
        ("a state per client", "Redis, 2 replicas", 2, ["redis"], "many"),
    ]
    print(f"{args.clients} client processes, {args.seconds:g} s a row, count(7) of counter.o\n")
    print("| states | kept by | executions/s |")
    print("| --- | --- | ---: |")
    for what, where, servers, flags, states in rows:
        with tempfile.TemporaryDirectory() as scratch:
            directory = Path(scratch)
            redis = RedisServer(directory) if flags == ["redis"] else None
            if redis is not None:
                flags = ["--store", redis.url, "--state-store", redis.url]
            running = [ServerProcess(directory / f"server-{n}.log", *flags) for n in range(servers)]
            try:
                rate = measure([s.address for s in running], states, args.clients, args.seconds)
            finally:
                for server in running:
                    server.kill()
                if redis is not None:
                    redis.kill()
        print(f"| {what} | {where} | {rate:,.0f} |", flush=True)
    hold_costs()


if __name__ == "__main__":
    main()
