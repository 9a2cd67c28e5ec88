"""Inputs per second of one function over many inputs, side by side in one run.

    python bench/bench_batch.py [--inputs 200000] [--server-inputs 2000]

Two programs: the seed's `example(a, b)` (tests/fixtures/obj/example-O2.o, a few
instructions) and a compute-heavy one, `collatz(n)` of bench/programs/compute.c
(compiled with clang, thousands of instructions an input). For each, the rows
are: `run_batch` locally on the interpreter (a hundredth of the inputs) and on
the JIT (a Result object an input); `run_packed` on the JIT (packed words in and
out, the native loop alone); the same function compiled natively (cc -O2) in a
C loop over the same packed inputs (bench/programs/batch_driver.c), the
function's own run time; through a server (its own process, JIT engine) one
unary `Execute` per input; and, when the client has it, one `ExecuteBatch`
stream for all inputs. Each figure is the best of `--repeat` runs; the table is
markdown. Goals (issue 19): 5 million small inputs a second locally on the JIT,
and a server batch 100 times the unary rate.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path

from bpfexec.client.client import Client
from bpfexec.vm import Program, load
from bpfexec.vm.batch import PACKED_INPUT_WORDS, run_batch, run_packed

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "tests" / "fixtures" / "obj" / "example-O2.o"
EXAMPLE_C = ROOT / "tests" / "fixtures" / "c" / "example.c"
COMPUTE = ROOT / "bench" / "programs" / "compute.c"
DRIVER = ROOT / "bench" / "programs" / "batch_driver.c"


def compile_compute(out: Path) -> Path | None:
    clang = shutil.which("clang")
    if clang is None:
        return None
    obj = out / "compute.o"
    flags = ["-O2", "-target", "bpf", "-mcpu=v3", "-ffreestanding"]
    subprocess.run([clang, *flags, "-c", str(COMPUTE), "-o", str(obj)], check=True)
    return obj


def compile_native(out: Path) -> ctypes.CDLL | None:
    """example, collatz and their C loops as one shared library (None without a C compiler)."""
    cc = shutil.which("cc") or shutil.which("clang")
    if cc is None:
        return None
    lib = out / "batch_native.so"
    sources = [str(EXAMPLE_C), str(COMPUTE), str(DRIVER)]
    subprocess.run([cc, "-O2", "-shared", "-fPIC", *sources, "-o", str(lib)], check=True)
    return ctypes.CDLL(str(lib))


def packed(inputs: Iterator[list[int]]) -> array[int]:
    words = array("Q")
    for args in inputs:
        words.extend(args + [0] * (PACKED_INPUT_WORDS - len(args)))
    return words


def local_packed(program: Program, function: str, words: array[int]) -> Callable[[], int]:
    def run() -> int:
        return len(run_packed(program, function, words, engine="jit")) // 3

    return run


def native_c(library: ctypes.CDLL, function: str, words: array[int]) -> Callable[[], int]:
    count = len(words) // PACKED_INPUT_WORDS
    results = array("Q", bytes(8 * count))
    loop = getattr(library, f"run_{function}")
    loop.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]

    def run() -> int:
        loop(words.buffer_info()[0], results.buffer_info()[0], count)
        return count

    return run


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
        native = compile_native(Path(scratch))
        cases: list[tuple[str, bytes, str, Callable[[int], Iterator[list[int]]]]] = [
            ("example", EXAMPLE.read_bytes(), "example", example_inputs)
        ]
        if compute is not None:
            cases.append(("collatz", compute.read_bytes(), "collatz", collatz_inputs))
        else:
            print("clang not found: the compute-heavy row is skipped", file=sys.stderr)
        process, address = start_server()
        rows: list[tuple[str, str, float, float, float | None]] = []
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
                        "local, JIT, run_packed": best_rate(
                            local_packed(program, function, packed(make(n))), args.repeat
                        ),
                        "server, unary Execute": best_rate(
                            unary(client, code, function, functools.partial(make, m)), args.repeat
                        ),
                    }
                    if native is not None:
                        rates["native C (cc -O2), a C loop"] = best_rate(
                            native_c(native, function, packed(make(n))), args.repeat
                        )
                    batch = streamed(client, code, function, functools.partial(make, n))
                    if batch is not None:
                        rates["server, ExecuteBatch"] = best_rate(batch, args.repeat)
                    unary_rate = rates["server, unary Execute"]
                    native_rate = rates.get("native C (cc -O2), a C loop")
                    for how, rate in rates.items():
                        rows.append((name, how, rate, rate / unary_rate, native_rate))
        finally:
            process.kill()
    print("| program | how | inputs/s | ns/input | rate, x unary Execute | time, x native C |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, how, rate, ratio, native_rate in rows:
        slower = f"{native_rate / rate:,.1f}" if native_rate else "-"
        print(f"| {name} | {how} | {rate:,.0f} | {1e9 / rate:,.0f} | {ratio:,.1f} | {slower} |")


if __name__ == "__main__":
    main()
