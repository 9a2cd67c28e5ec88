"""Benchmark: the same C programs on the interpreter, the JIT and native code, in one run.

    python bench/bench_engines.py [--quick] [--repeat N]

Each program of `bench/programs/` is compiled twice from the same source: to
eBPF with clang (`-O2 -target bpf`), loaded and run by both engines with fuel
and bounds checks on; and natively with the system C compiler (`cc -O2
-shared`), called through ctypes. For every case the script prints the best
time of `--repeat` runs, eBPF instructions per second (the fuel used) and the
ratios, then the JIT's compile time per module and how two threads running
native code at once scale against one.

The interpreter runs a smaller input where the full one would take too long;
its time is then scaled up by instruction count (marked with `~`).
It measures, it never asserts: tests live in `tests/`.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import vm
from vm.loader import load

PROGRAMS = Path(__file__).parent / "programs"
INTERPRETER_BUDGET = 3_000_000  # instructions the interpreter runs per case at most


@dataclass(frozen=True)
class Case:
    module: str  # bench/programs/<module>.c
    function: str
    # size -> (VM arguments, native arguments): the same values, buffers as bytes
    args: Callable[[int], list[int | bytes]]
    size: int  # the full input size
    check: Callable[[int, list[int | bytes]], int] | None = None  # expected r0


def _buffer(n: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(n)


def _sha_check(_: int, args: list[int | bytes]) -> int:
    digest = hashlib.sha256(args[0][: args[1]]).digest()  # type: ignore[index,misc]
    return int.from_bytes(digest[:8], "big")


CASES = [
    Case("compute", "sum", lambda n: [n], 10_000_000, lambda n, a: n * (n + 1) // 2),
    Case("compute", "fib_iter", lambda n: [n], 10_000_000),
    Case("compute", "fib_rec", lambda n: [n], 27),
    Case("compute", "byte_sum", lambda n: [_buffer(n), n], 1 << 22),
    Case("compute", "fnv1a", lambda n: [_buffer(4096), 4096, n], 256),
    Case("compute", "crc32", lambda n: [_buffer(n), n], 1 << 19),
    Case("compute", "sort_bytes", lambda n: [_buffer(n), n], 3000),
    Case("sha256", "sha256", lambda n: [_buffer(n), n, bytes(32)], 1 << 20, _sha_check),
]


def build(work: Path) -> tuple[dict[str, vm.Program], dict[str, ctypes.CDLL]]:
    clang = shutil.which("clang")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if clang is None or cc is None:
        sys.exit("needs clang (for eBPF) and a system C compiler (cc)")
    programs, libraries = {}, {}
    for source in sorted(PROGRAMS.glob("*.c")):
        obj = work / f"{source.stem}.o"
        lib = work / f"lib{source.stem}.so"
        subprocess.run(
            [clang, "-O2", "-target", "bpf", "-ffreestanding", "-c", str(source), "-o", str(obj)],
            check=True,
        )
        subprocess.run([cc, "-O2", "-shared", "-fPIC", str(source), "-o", str(lib)], check=True)
        programs[source.stem] = load(obj.read_bytes(), name=source.name)
        libraries[source.stem] = ctypes.CDLL(str(lib))
    return programs, libraries


def best(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def run_vm(program: vm.Program, case: Case, size: int, engine: str) -> vm.Result:
    result = vm.execute(program, case.function, case.args(size), fuel=10**10, engine=engine)
    if result.trap is not None:
        raise RuntimeError(f"{case.function} on {engine}: {result.trap}")
    return result


def run_native(library: ctypes.CDLL, case: Case, size: int) -> int:
    fn = getattr(library, case.function)
    fn.restype = ctypes.c_uint64
    args: list[object] = []
    for arg in case.args(size):
        if isinstance(arg, bytes):
            args.append(ctypes.create_string_buffer(arg, len(arg)))
        else:
            args.append(ctypes.c_uint64(arg))
    return int(fn(*args))


def rate(instructions: int, seconds: float) -> str:
    return f"{instructions / seconds / 1e6:,.0f} M/s"


def bench_cases(programs, libraries, repeat: int, quick: bool) -> None:
    print("| program | eBPF instructions | interpreter | JIT | native C | JIT vs interpreter "
          "| JIT / native | JIT instr/s |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for case in CASES:
        program, library = programs[case.module], libraries[case.module]
        size = case.size // 16 if quick and case.function != "fib_rec" else case.size
        jit_time, jit = best(lambda: run_vm(program, case, size, "jit"), repeat)  # noqa: B023
        native_time, native = best(lambda: run_native(library, case, size), repeat)  # noqa: B023
        assert isinstance(jit, vm.Result)
        if jit.return_value != native:
            raise RuntimeError(f"{case.function}: JIT {jit.return_value:#x}, native {native:#x}")
        if case.check and jit.return_value != case.check(size, case.args(size)):
            raise RuntimeError(f"{case.function}: wrong result {jit.return_value:#x}")
        instructions = jit.fuel_used
        small, scale = size, 1.0
        while small > 1 and instructions * small / size > INTERPRETER_BUDGET:
            small //= 2
        interp = run_vm(program, case, small, "interpreter")
        interp_time, _ = best(lambda: run_vm(program, case, small, "interpreter"), 1)  # noqa: B023
        if small != size:
            scale = instructions / interp.fuel_used
        interp_time *= scale
        mark = "~" if small != size else ""
        print(
            f"| {case.function}({size}) | {instructions:,} | {mark}{interp_time * 1e3:,.1f} ms "
            f"| {jit_time * 1e3:,.2f} ms | {native_time * 1e3:,.2f} ms "
            f"| {interp_time / jit_time:,.0f}x | {jit_time / native_time:.2f} "
            f"| {rate(instructions, jit_time)} |"
        )


def bench_compile(work: Path) -> None:
    from vm.jit import compile_program

    print("\n| module | instructions | JIT compile time | per 1,000 instructions |")
    print("| --- | ---: | ---: | ---: |")
    for source in sorted(PROGRAMS.glob("*.c")):
        data = (work / f"{source.stem}.o").read_bytes()
        times = []
        for _ in range(3):
            program = load(data, name=source.name)  # a fresh Program: nothing cached
            times.append(compile_program(program).compile_seconds)
        count = len(program.instructions)
        seconds = min(times)
        print(
            f"| {source.name} | {count:,} | {seconds * 1e3:.1f} ms "
            f"| {seconds * 1e3 * 1000 / count:.1f} ms |"
        )


def bench_threads(program: vm.Program, n: int) -> None:
    def one() -> None:
        run_vm(program, CASES[0], n, "jit")

    one()
    single, _ = best(one, 3)

    def pair() -> None:
        threads = [threading.Thread(target=one) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    double, _ = best(pair, 3)
    print("\n| threads | wall time | work done | speed-up |")
    print("| ---: | ---: | ---: | ---: |")
    print(f"| 1 | {single * 1e3:.1f} ms | 1x | 1.00 |")
    print(f"| 2 | {double * 1e3:.1f} ms | 2x | {2 * single / double:.2f} |")
    print(f"\n(host: {os.cpu_count()} CPUs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per case (best is kept)")
    parser.add_argument("--quick", action="store_true", help="inputs 16 times smaller")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bpfexec-bench-") as tmp:
        work = Path(tmp)
        programs, libraries = build(work)
        bench_cases(programs, libraries, options.repeat, options.quick)
        bench_compile(work)
        bench_threads(programs["compute"], 50_000_000)


if __name__ == "__main__":
    main()
