"""Inputs per second of one function over many inputs, side by side in one run.

    python bench/bench_batch.py [--inputs 200000] [--server-inputs 2000]

Two programs: the seed's `example(a, b)` (tests/fixtures/obj/example-O2.o, a few
instructions) and a compute-heavy one, `collatz(n)` of bench/programs/compute.c
(compiled with clang, thousands of instructions an input). For each, the rows
are: `run_batch` locally on the interpreter (a hundredth of the inputs) and on
the JIT; through a server (its own process, JIT engine) one unary `Execute` per
input; and, when the client has it, one `ExecuteBatch` stream for all inputs.
Each figure is the best of `--repeat` runs; the table is markdown. Goals
(issue 19): 5 million small inputs a second locally on the JIT, and a server
batch 100 times the unary rate.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path

from bpfexec.client.client import Client
from bpfexec.vm import Program, load
from bpfexec.vm.batch import run_batch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "tests" / "fixtures" / "obj" / "example-O2.o"
COMPUTE = ROOT / "bench" / "programs" / "compute.c"


def compile_compute(out: Path) -> Path | None:
    clang = shutil.which("clang")
    if clang is None:
        return None
    obj = out / "compute.o"
    flags = ["-O2", "-target", "bpf", "-mcpu=v3", "-ffreestanding"]
    subprocess.run([clang, *flags, "-c", str(COMPUTE), "-o", str(obj)], check=True)
    return obj


def example_inputs(count: int) -> Iterator[list[int]]:
    return ([n % 8, n] for n in range(count))


def collatz_inputs(count: int) -> Iterator[list[int]]:
    return ([27 + n % 1000] for n in range(count))


def best_rate(run: Callable[[], int], repeat: int) -> float:
    """Inputs a second: the best of `repeat` runs of `run` (which returns its count)."""
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        count = run()
        best = max(best, count / (time.perf_counter() - start))
    return best


def local(program: Program, function: str, inputs: Callable[[], Iterator[list[int]]],
          engine: str) -> Callable[[], int]:  # fmt: skip
    def run() -> int:
        return sum(1 for _ in run_batch(program, function, inputs(), engine=engine))

    return run


def _serve(ready: Connection) -> None:
    from bpfexec.server.app import start
    from bpfexec.server.settings import Settings

    async def main() -> None:
        running = await start(Settings(port=0, metrics_port=0, engine="jit"))
        ready.send(running.port)
        await asyncio.Event().wait()

    asyncio.run(main())


def start_server() -> tuple[multiprocessing.Process, str]:
    receive, send = multiprocessing.Pipe(duplex=False)
    process = multiprocessing.Process(target=_serve, args=(send,), daemon=True)
    process.start()
    if not receive.poll(60):
        raise RuntimeError("the server did not start")
    return process, f"127.0.0.1:{receive.recv()}"


def unary(client: Client, code: bytes, function: str,
          inputs: Callable[[], Iterator[list[int]]]) -> Callable[[], int]:  # fmt: skip
    module = client.load(code, function)

    def run() -> int:
        count = 0
        for args in inputs():
            client.execute(module, function, args)
            count += 1
        return count

    return run


def streamed(client: Client, code: bytes, function: str,
             inputs: Callable[[], Iterator[list[int]]]) -> Callable[[], int] | None:  # fmt: skip
    execute_batch = getattr(client, "execute_batch", None)
    if execute_batch is None:
        return None
    module = client.load(code, function)

    def run() -> int:
        return sum(1 for _ in execute_batch(module, function, inputs()))

    return run


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=200_000, help="inputs of a local batch")
    parser.add_argument("--server-inputs", type=int, default=2_000, help="inputs through a server")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        compute = compile_compute(Path(scratch))
        cases: list[tuple[str, bytes, str, Callable[[int], Iterator[list[int]]]]] = [
            ("example", EXAMPLE.read_bytes(), "example", example_inputs)
        ]
        if compute is not None:
            cases.append(("collatz", compute.read_bytes(), "collatz", collatz_inputs))
        else:
            print("clang not found: the compute-heavy row is skipped", file=sys.stderr)
        process, address = start_server()
        rows = []
        try:
            with Client(address, timeout=600) as client:
                for name, code, function, make in cases:
                    program = load(code, name=name)
                    n, m = args.inputs, args.server_inputs
                    rates = {
                        "local, interpreter": best_rate(
                            local(
                                program, function, functools.partial(make, n // 100), "interpreter"
                            ),
                            args.repeat,
                        ),
                        "local, JIT": best_rate(
                            local(program, function, functools.partial(make, n), "jit"), args.repeat
                        ),
                        "server, unary Execute": best_rate(
                            unary(client, code, function, functools.partial(make, m)), args.repeat
                        ),
                    }
                    batch = streamed(client, code, function, functools.partial(make, n))
                    if batch is not None:
                        rates["server, ExecuteBatch"] = best_rate(batch, args.repeat)
                    unary_rate = rates["server, unary Execute"]
                    for how, rate in rates.items():
                        rows.append((name, how, rate, rate / unary_rate))
        finally:
            process.kill()
    print("| program | how | inputs/s | µs/input | x unary Execute |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, how, rate, ratio in rows:
        print(f"| {name} | {how} | {rate:,.0f} | {1e6 / rate:.2f} | {ratio:,.1f} |")


if __name__ == "__main__":
    main()
