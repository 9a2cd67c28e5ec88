"""Load and fault scenarios against a real `bpfexec serve` process, with their figures.

    python bench/bench_load.py [--seconds 30] [--concurrency 16] [--engine E]
                               [--scenarios sustained killed flood overload sigterm]

The long versions of tests/test_load_fault.py. Each scenario starts its own
server process on free localhost ports, drives it over gRPC from this process
(client threads, or client processes where a client must die), reads the
server's resident memory from /proc/PID/status and its metrics over HTTP:

- sustained: `--concurrency` client threads, one connection each, execute two
  small programs for `--seconds`; throughput, p50/p99/p99.9 latency, errors,
  RSS after the warm-up and at the end (and its peak in between);
- killed: rounds of client processes blocked inside a remote helper, then
  SIGKILLed; time until the server's in-flight gauge is back to 0;
- flood: `--flood` malformed uploads (random bytes, truncated ELF objects) in
  flight at once; the statuses, the time, and a check the server still serves;
- overload: room for 2 executions, `--excess` more arriving while 2 long ones
  run; refusal latency and health-check latency during the overload;
- sigterm: SIGTERM with uploads and executions in flight; drain time, what each
  in-flight call got, and how many acknowledged uploads a restart finds.

Linux only (/proc). Prints one markdown table per scenario.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import grpc

from bpfexec._pb.bpfexec.v1 import executor_pb2 as pb
from bpfexec._pb.bpfexec.v1 import executor_pb2_grpc as pb_grpc
from bpfexec.client.cli_remote import check_health
from bpfexec.client.client import Client
from bpfexec.client.errors import BpfexecError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from server_process import (
    ADD_ONE,
    BLOCKED_CLIENT,
    CALL_THEN_COUNT,
    COUNT_TO_R1,
    FOREVER,
    NEVER_ENDS,
    ROOT,
    ServerProcess,
    malformed_modules,
    percentile,
)
from support import wait_until


def start_server(engine: str, *flags: str) -> ServerProcess:
    """A server process on `engine`, its log in a fresh temporary directory."""
    log = Path(tempfile.mkdtemp(prefix="bpfexec-bench-")) / "server.log"
    return ServerProcess(log, "--engine", engine, *flags)


def table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| figure | value |", "| --- | ---: |"] + [f"| {k} | {v} |" for k, v in rows])


def sustained(engine: str, seconds: float, concurrency: int) -> list[tuple[str, str]]:
    server = start_server(engine)
    try:
        with Client(server.address, timeout=30) as client:
            add_one, count = client.load(ADD_ONE), client.load(COUNT_TO_R1)
        server.wait_for_jit(2, engine, timeout=60)
        own_connection = [("grpc.use_local_subchannel_pool", 1)]
        clients = [
            Client(server.address, timeout=30, options=own_connection) for _ in range(concurrency)
        ]
        errors: Counter[str] = Counter()

        def drive(i: int, until: float) -> tuple[list[float], int]:
            """Execute until `until` on client i: the latencies, and the wrong results."""
            latencies, wrong, n = [], 0, i
            while time.perf_counter() < until:
                n += concurrency
                start = time.perf_counter()
                try:
                    if n % 2:
                        ok = clients[i].execute(add_one, args=[n]).return_value == n + 1
                    else:
                        target = 2000 + n % 100  # beyond the inline slice: the pool runs it
                        ok = clients[i].execute(count, args=[target]).return_value == target
                except BpfexecError as error:
                    errors[error.code.name] += 1
                    continue
                latencies.append(time.perf_counter() - start)
                wrong += not ok
            return latencies, wrong

        with ThreadPoolExecutor(concurrency) as pool:
            warm_up = time.perf_counter() + 2  # connections, caches, code paths
            list(pool.map(drive, range(concurrency), [warm_up] * concurrency))
            errors.clear()
            rss_start = peak = server.rss_kib() / 1024
            start = time.perf_counter()
            runs = [pool.submit(drive, i, start + seconds) for i in range(concurrency)]
            while not all(run.done() for run in runs):
                peak = max(peak, server.rss_kib() / 1024)
                time.sleep(0.5)
            elapsed = time.perf_counter() - start
            rss_end = server.rss_kib() / 1024
        for client in clients:
            client.close()
        every = [latency for run in runs for latency in run.result()[0]]
        wrong = sum(run.result()[1] for run in runs)
        quantiles = " / ".join(f"{percentile(every, q) * 1e3:.2f}" for q in (50, 99, 99.9))
        return [
            ("client threads (one connection each)", str(concurrency)),
            ("executions", f"{len(every):,} in {elapsed:.1f} s"),
            ("executions/s", f"{len(every) / elapsed:,.0f}"),
            ("p50 / p99 / p99.9 ms", quantiles),
            ("errors / wrong results", f"{sum(errors.values())} {dict(errors)} / {wrong}"),
            ("RSS after warm-up / peak / end MiB", f"{rss_start:.1f} / {peak:.1f} / {rss_end:.1f}"),
        ]
    finally:
        server.kill()


def killed(engine: str, rounds: int, clients: int) -> list[tuple[str, str]]:
    """Rounds of `clients` client processes killed inside a remote helper call.

    A server that dies is counted as a crash, with where it crashed, and
    replaced by a fresh one for the next round.
    """
    flags = ("--max-concurrent-executions", str(clients), "--remote-helper-timeout", "60")
    server = start_server(engine, *flags)
    freed: list[float] = []
    crashes: list[str] = []
    try:
        for _ in range(rounds):
            with Client(server.address, timeout=30) as client:
                module = client.load(CALL_THEN_COUNT)
                command = [sys.executable, "-c", BLOCKED_CLIENT, server.address, module.id]
                children = [
                    subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
                    for _ in range(clients)
                ]
                try:
                    for child in children:
                        assert child.stdout is not None and child.stdout.readline() == "in-helper\n"
                    killed_at = time.perf_counter()
                    for child in children:
                        child.kill()
                    try:
                        wait_until(partial(idle, server), 30, what="the executions to stop")
                        freed.append(time.perf_counter() - killed_at)
                        result = client.execute(module, helpers={100: lambda call, *r: 0})
                        assert result.return_value == 100_000
                    except (OSError, BpfexecError):
                        pass  # the server is gone: counted below
                finally:
                    for child in children:
                        child.kill()
                        child.wait(30)
            time.sleep(0.2)  # a crash in a late clean-up happens just after the round
            crash = server.crash()
            if crash is not None:
                crashes.append(crash)
                server.kill()
                server = start_server(engine, *flags)
        median = statistics.median(freed) * 1e3 if freed else float("nan")
        slowest = max(freed) * 1e3 if freed else float("nan")
        return [
            ("client processes killed (rounds x clients)", f"{rounds} x {clients}"),
            ("time to free the executions, median / max ms", f"{median:.0f} / {slowest:.0f}"),
            ("server crashes", f"{len(crashes)}" + "".join(f"; {c}" for c in Counter(crashes))),
        ]
    finally:
        server.kill()


def flood(engine: str, count: int) -> list[tuple[str, str]]:
    modules = malformed_modules(count)
    server = start_server(engine, "--max-concurrent-requests", str(count + 10))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ExecutorStub(channel)
            good = stub.LoadModule(pb.LoadModuleRequest(code=ADD_ONE), timeout=30)
            start = time.perf_counter()
            calls = [
                stub.LoadModule.future(pb.LoadModuleRequest(code=code), timeout=120)
                for code in modules
            ]
            codes: Counter[str] = Counter()
            for call in calls:
                error = call.exception()
                codes[error.code().name if isinstance(error, grpc.Call) else "OK"] += 1
            elapsed = time.perf_counter() - start
            request = pb.ExecuteRequest(module_id=good.id, args=[pb.Argument(value=41)])
            serves = stub.Execute(request, timeout=30).return_value == 42
        return [
            ("malformed uploads in flight at once", f"{count:,}"),
            ("statuses", ", ".join(f"{code} {n}" for code, n in codes.items())),
            ("uploads answered/s", f"{count / elapsed:,.0f}"),
            ("module loaded before still runs", "yes" if serves else "NO"),
            ("RSS after the flood MiB", f"{server.rss_kib() / 1024:.1f}"),
        ]
    finally:
        server.kill()


def overload(engine: str, excess: int) -> list[tuple[str, str]]:
    server = start_server(engine, "--max-concurrent-executions", "2", "--max-fuel", str(NEVER_ENDS))
    try:
        with Client(server.address, timeout=60) as client:
            module = client.load(COUNT_TO_R1)
            server.wait_for_jit(1, engine, timeout=60)
            n = calibrate(client, module, 3.0)  # each admitted run takes about 3 s
            health: list[float] = []
            done = threading.Event()

            def probe_health() -> None:
                while not done.is_set():
                    begin = time.perf_counter()
                    assert check_health(server.address, timeout=30) == "SERVING"
                    health.append(time.perf_counter() - begin)
                    time.sleep(0.02)

            def attempt(_: int) -> tuple[str, float]:
                begin = time.perf_counter()
                try:
                    ok = client.execute(module, args=[n], fuel=NEVER_ENDS).return_value == n
                    return ("OK" if ok else "WRONG"), time.perf_counter() - begin
                except BpfexecError as error:
                    return error.code.name, time.perf_counter() - begin

            with ThreadPoolExecutor(2 + excess) as pool:
                admitted = [pool.submit(attempt, i) for i in range(2)]
                wait_until(
                    lambda: server.metric("bpfexec_executions_in_flight") == 2, 30, what="runs"
                )
                prober = threading.Thread(target=probe_health)
                prober.start()
                refused = list(pool.map(attempt, range(excess)))
                finished = [future.result() for future in admitted]
                done.set()
                prober.join()
        refusals = [seconds * 1e3 for code, seconds in refused if code == "RESOURCE_EXHAUSTED"]
        checks = [seconds * 1e3 for seconds in health]
        excess_codes = Counter(code for code, _ in refused)
        return [
            ("admitted (the limit) / arriving while they run", f"2 / {excess}"),
            ("admitted runs", f"{', '.join(code for code, _ in finished)} (about 3 s each)"),
            ("the others", ", ".join(f"{code} {n}" for code, n in excess_codes.items())),
            ("refusal latency median / max ms", f"{median(refusals)} / {top(refusals)}"),
            (
                "health check during the overload median / max ms",
                f"{median(checks)} / {top(checks)}",
            ),
        ]
    finally:
        server.kill()


def sigterm(engine: str, grace: float) -> list[tuple[str, str]]:
    store = tempfile.mkdtemp(prefix="bpfexec-bench-store-")
    flags = ("--store", store, "--grace-period", str(grace), "--max-fuel", str(NEVER_ENDS))
    server = start_server(engine, *flags)
    uploaded: list[str] = []
    uploads: Counter[str] = Counter()
    outcomes: dict[str, str] = {}
    stop = threading.Event()
    try:
        with Client(server.address, timeout=30) as client:
            count, forever = client.load(COUNT_TO_R1), client.load(FOREVER)
            server.wait_for_jit(2, engine, timeout=60)
            n = calibrate(client, count, grace / 3)  # a third of the grace period alone

        def upload(worker: int) -> None:
            with Client(server.address, timeout=30) as own:
                for i in range(10**9):
                    if stop.is_set():
                        return
                    try:
                        uploaded.append(own.load(f"r0 = {worker}\nr0 += {i}\nexit\n".encode()).id)
                        uploads["OK"] += 1
                    except BpfexecError as error:
                        uploads[error.code.name] += 1
                        return

        def run(name: str) -> None:
            with Client(server.address, timeout=120) as own:
                try:
                    if name == "never-ending":
                        own.execute(forever, fuel=NEVER_ENDS)
                    else:
                        assert own.execute(count, args=[n], fuel=NEVER_ENDS).return_value == n
                    outcomes[name] = "OK"
                except BpfexecError as error:
                    outcomes[name] = error.code.name

        names = ["fits the grace 1", "fits the grace 2", "never-ending"]
        workers = [threading.Thread(target=upload, args=(i,)) for i in range(4)]
        workers += [threading.Thread(target=run, args=(name,)) for name in names]
        for worker in workers:
            worker.start()
        wait_until(lambda: server.metric("bpfexec_executions_in_flight") == 3, 30, what="runs")
        wait_until(lambda: uploads["OK"] >= 4, 30, what="uploads")
        signalled = time.perf_counter()
        server.process.send_signal(signal.SIGTERM)
        status = server.process.wait(grace + 60)
        drain = time.perf_counter() - signalled
        stop.set()
        for worker in workers:
            worker.join(60)
        restarted = start_server(engine, "--store", store)
        try:
            with Client(restarted.address, timeout=30) as client:
                present = {module.id for module in client.list_modules()}
        finally:
            restarted.kill()
        return [
            ("grace period s", f"{grace:g}"),
            ("SIGTERM to exit s (exit status)", f"{drain:.2f} ({status})"),
            ("executions in flight", ", ".join(f"{k}: {v}" for k, v in outcomes.items())),
            ("uploads", ", ".join(f"{code} {n}" for code, n in uploads.items())),
            ("acknowledged uploads missing after a restart", str(len(set(uploaded) - present))),
        ]
    finally:
        stop.set()
        server.kill()


def calibrate(client: Client, module: object, seconds: float) -> int:
    """The count for COUNT_TO_R1 that runs about `seconds` on this server, alone."""
    n = 10**5
    while True:
        start = time.perf_counter()
        client.execute(module, args=[n], fuel=NEVER_ENDS)  # type: ignore[arg-type]
        elapsed = time.perf_counter() - start
        if elapsed > 0.2:
            return int(n * seconds / elapsed)
        n *= 10


def idle(server: ServerProcess) -> bool:
    return server.metric("bpfexec_executions_in_flight") == 0


def median(values: list[float]) -> str:
    return f"{statistics.median(values):.0f}" if values else "-"


def top(values: list[float]) -> str:
    return f"{max(values):.0f}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="sustained load duration")
    parser.add_argument("--concurrency", type=int, default=16, help="sustained client threads")
    parser.add_argument("--engine", default=None, help="server engine (default: the server's)")
    parser.add_argument("--rounds", type=int, default=5, help="killed-client rounds")
    parser.add_argument("--clients", type=int, default=4, help="client processes killed per round")
    parser.add_argument("--flood", type=int, default=1000, help="malformed uploads in flight")
    parser.add_argument("--excess", type=int, default=40, help="executions beyond the limit")
    parser.add_argument("--grace", type=float, default=5.0, help="grace period for SIGTERM")
    parser.add_argument(
        "--scenarios", nargs="+", default=["sustained", "killed", "flood", "overload", "sigterm"]
    )
    args = parser.parse_args()
    if args.engine is None:
        from bpfexec.vm.machine import available_engines

        args.engine = available_engines()[-1]
    scenarios = {
        "sustained": lambda: sustained(args.engine, args.seconds, args.concurrency),
        "killed": lambda: killed(args.engine, args.rounds, args.clients),
        "flood": lambda: flood(args.engine, args.flood),
        "overload": lambda: overload(args.engine, args.excess),
        "sigterm": lambda: sigterm(args.engine, args.grace),
    }
    print(f"engine {args.engine}, {os.cpu_count()} CPUs")
    for name in args.scenarios:
        print(f"\n### {name}\n\n{table(scenarios[name]())}", flush=True)


if __name__ == "__main__":
    main()
