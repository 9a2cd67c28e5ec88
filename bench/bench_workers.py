"""Execute throughput of `bpfexec serve --workers N`, for N = 1 and 2, in one run.

    python bench/bench_workers.py [--seconds 5] [--clients 8] [--workers 1 2]

For each worker count a real `bpfexec serve` process is started on a free
localhost port. The load comes from a pool of separate client processes (so
the client's own Python work is not serialised behind one GIL), each on its
own connection, since SO_REUSEPORT spreads connections, not requests, over
the workers. All clients start at the same instant and stop after `--seconds`.
Two programs: a loop whose execution dominates the cost of a request, and a
three-instruction one where gRPC's per-request cost dominates. Prints a
markdown table; the speedup is against the first worker count.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import grpc

from bpfexec._pb.bpfexec.v1 import executor_pb2 as pb
from bpfexec._pb.bpfexec.v1 import executor_pb2_grpc as pb_grpc
from bpfexec.client.cli_remote import check_health

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = {
    "loop of 1000 (~3000 insns)": (b"r0 = 0\nloop:\nr0 += 1\nif r0 < r1 goto loop\nexit\n", 1000),
    "add one (3 insns)": (b"r0 = r1\nr0 += 1\nexit\n", 41),
}
START_DELAY = 3.0  # seconds for every client process to start before the common start


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _client(address: str, code: bytes, arg: int, start_at: float, seconds: float) -> int:
    """Executions completed by one client connection between start_at and start_at+seconds."""
    options = [("grpc.use_local_subchannel_pool", 1)]  # its own TCP connection
    with grpc.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.ExecutorStub(channel)
        module = stub.LoadModule(pb.LoadModuleRequest(code=code), timeout=10)
        request = pb.ExecuteRequest(module_id=module.id, args=[pb.Argument(value=arg)])
        stub.Execute(request, timeout=10)  # warm: connection up, module cached
        time.sleep(max(0.0, start_at - time.time()))
        done, stop_at = 0, start_at + seconds
        while time.time() < stop_at:
            stub.Execute(request, timeout=10)
            done += 1
        return done


def _measure(workers: int, clients: int, seconds: float) -> dict[str, float]:
    """Executions per second of each program against a server of `workers` processes."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BPFEXEC_")}
    command = [
        sys.executable, "-m", "bpfexec.client.cli", "serve", "--workers", str(workers),
        "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
        "--no-entry-point-helpers", "--max-concurrent-executions", "64", "--grace-period", "1",
    ]  # fmt: skip
    server = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while check_health(address, timeout=0.5) != "SERVING":
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"bpfexec serve --workers {workers} did not start")
            time.sleep(0.1)
        rates = {}
        with ProcessPoolExecutor(clients, mp_context=get_context("spawn")) as pool:
            for name, (code, arg) in PROGRAMS.items():
                start_at = time.time() + START_DELAY
                futures = [
                    pool.submit(_client, address, code, arg, start_at, seconds)
                    for _ in range(clients)
                ]
                rates[name] = sum(f.result(timeout=START_DELAY + seconds + 30) for f in futures)
                rates[name] /= seconds
        return rates
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per row")
    parser.add_argument("--clients", type=int, default=8, help="client processes (connections)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    results = {workers: _measure(workers, args.clients, args.seconds) for workers in args.workers}
    base = args.workers[0]
    print(f"{os.cpu_count()} CPUs, {args.clients} client processes, {args.seconds:g} s per row\n")
    print("| program | workers | executions/s | speedup |")
    print("| --- | ---: | ---: | ---: |")
    for name in PROGRAMS:
        for workers in args.workers:
            rate = results[workers][name]
            print(f"| {name} | {workers} | {rate:,.0f} | {rate / results[base][name]:.2f}x |")


if __name__ == "__main__":
    main()
