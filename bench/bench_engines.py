"""Benchmark: the same C programs on the interpreter, the JIT and native code, in one run.

    python bench/bench_engines.py [--quick] [--repeat N] [--ubpf-lib DIR] [--mcpu v1]

Each program of `bench/programs/` is compiled twice from the same source: to
eBPF with clang (`-O2 -target bpf -mcpu=v3`: the instruction set clang 20 and
later target by default, with 32-bit ALU and jump instructions; `--mcpu v1`
for the old default), loaded and run by both engines with fuel
and bounds checks on; and natively with the system C compiler (`cc -O2
-shared`), called through ctypes. For every case the script prints the best
time of `--repeat` runs, eBPF instructions per second (the fuel used) and the
ratios, then the JIT's compile time per module and how two threads running
native code at once scale against one.

The interpreter runs a smaller input where the full one would take too long;
its time is then scaled up by instruction count (marked with `~`).
It measures, it never asserts: tests live in `tests/`.

With `--ubpf-lib DIR` (a uBPF build, made by the reader from the upstream
project: `libubpf.a` and `ubpf.h`), `bench/ubpf_runner.c` is compiled against
it and a second table puts uBPF's x86-64 JIT beside ours and native code on
the same bytecode and inputs. Its times are per run only: the inputs are
built outside the timed region for all three (in the first table, the JIT and
native columns also pay for building them in Python), our JIT's time is
`Result.duration_ns` (the engine's run, without `prepare`), and checks stay on.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bpfexec
from bpfexec import vm
from bpfexec.vm import isa
from bpfexec.vm.loader import load
from bpfexec.vm.memory import RODATA_BASE

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
    Case("compute", "sieve", lambda n: [bytes(n), n], 1 << 20),
    Case("compute", "collatz", lambda n: [n], 20_000),
    Case("compute", "matmul", lambda n: [_buffer(4 * n * n), n], 96),
    Case("compute", "histogram", lambda n: [_buffer(n), n], 1 << 21),
    Case("compute", "list_walk", lambda n: [bytes(16 * 1024), 1024, n], 1 << 21),
    Case("sha256", "sha256", lambda n: [_buffer(n), n, bytes(32)], 1 << 20, _sha_check),
]


def _c_compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def compile_ebpf(source: Path, obj: Path, mcpu: str) -> Path:
    """clang -O2 -target bpf -mcpu=MCPU: a program's eBPF build (obj, returned)."""
    clang = shutil.which("clang")
    if clang is None:
        sys.exit("needs clang (for eBPF)")
    ebpf = [clang, "-O2", "-target", "bpf", f"-mcpu={mcpu}", "-ffreestanding"]
    subprocess.run([*ebpf, "-c", str(source), "-o", str(obj)], check=True)
    return obj


def compile_shared(source: Path, lib: Path) -> Path:
    """cc -O2 -shared -fPIC: a program's native build (lib, returned)."""
    cc = _c_compiler()
    if cc is None:
        sys.exit("needs a system C compiler (cc)")
    include = f"-I{bpfexec.include_dir()}"  # bpfexec_helper.h, for native helpers
    subprocess.run(
        [cc, "-O2", "-shared", "-fPIC", include, str(source), "-o", str(lib)], check=True
    )
    return lib


def build(work: Path, mcpu: str) -> tuple[dict[str, vm.Program], dict[str, ctypes.CDLL]]:
    if shutil.which("clang") is None or _c_compiler() is None:
        sys.exit("needs clang (for eBPF) and a system C compiler (cc)")
    programs, libraries = {}, {}
    for source in sorted(PROGRAMS.glob("*.c")):
        obj = compile_ebpf(source, work / f"{source.stem}.o", mcpu)
        lib = compile_shared(source, work / f"lib{source.stem}.so")
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


# uBPF's x86-64 JIT beside ours (--ubpf-lib): the same bytecode behind an entry stub.


def build_ubpf_runner(work: Path, lib_dir: Path, helpers: Path | None = None) -> Path:
    """Compile bench/ubpf_runner.c against a uBPF build (libubpf.a, ubpf.h).

    With `helpers` (bench/helpers/sqrti.c), the runner is linked with it and built
    in its helpers mode (UBPF_RUNNER_HELPERS), as `ubpf_helper_runner`.
    """
    cc = _c_compiler()
    libs = [d / "libubpf.a" for d in (lib_dir, lib_dir / "lib") if (d / "libubpf.a").is_file()]
    includes = [d for d in (lib_dir, lib_dir / "include") if (d / "ubpf.h").is_file()]
    if cc is None or not libs or not includes:
        sys.exit(f"--ubpf-lib {lib_dir}: needs a C compiler, libubpf.a and ubpf.h there")
    runner = work / ("ubpf_runner" if helpers is None else "ubpf_helper_runner")
    sources = [str(Path(__file__).parent / "ubpf_runner.c")]
    if helpers is not None:
        sources = ["-DUBPF_RUNNER_HELPERS", f"-I{bpfexec.include_dir()}", *sources, str(helpers)]
    subprocess.run(
        [cc, "-O2", f"-I{includes[0]}", *sources, str(libs[0]), "-o", str(runner)], check=True
    )
    return runner


def ubpf_inputs(program: vm.Program, function: str, args: list[int | bytes]) -> tuple[bytes, bytes]:
    """Bytecode and memory image for uBPF, whose JIT enters at pc 0 with r1 = memory.

    The memory holds one 8-byte slot per argument (integers in place, buffers
    after the slots, 8-byte aligned). A stub in front of the program's own,
    unchanged code loads r1..r5 from it and calls `function`, so both JITs run
    the same instructions on the same inputs.
    """
    if program.data:
        raise RuntimeError(f"{program.name}: writable globals are not supported on uBPF here")
    memory = bytearray(8 * len(args))
    mov, add = isa.ALU64 | isa.MOV | isa.X, isa.ALU64 | isa.ADD | isa.K
    stub = [isa.Instruction(mov, dst=0, src=1)]  # r0 = the memory
    for reg, arg in enumerate(args, start=1):
        if isinstance(arg, bytes):
            stub.append(isa.Instruction(mov, dst=reg, src=0))
            stub.append(isa.Instruction(add, dst=reg, imm=len(memory)))
            memory += arg + bytes(-len(arg) % 8)
        else:
            slot = 8 * (reg - 1)
            memory[slot : slot + 8] = (arg & isa.MASK64).to_bytes(8, "little")
            stub.append(isa.Instruction(isa.LDX | isa.MEM | isa.DW, dst=reg, src=0, offset=slot))
    # A local call, not a jump: the function may itself be a call target (fib_rec), and
    # uBPF gives call targets a prologue that only a call balances.
    entry = program.function(function).pc
    stub.append(isa.Instruction(isa.JMP | isa.CALL, src=isa.CALL_LOCAL, imm=entry + 1))
    stub.append(isa.Instruction(isa.JMP | isa.EXIT))
    return isa.encode([*stub, *program.instructions]), bytes(memory)


def run_ubpf(
    runner: Path, work: Path, program: vm.Program, function: str, args: list[int | bytes], runs: int
) -> tuple[float, int]:
    """Best seconds of `runs` calls of uBPF's JIT code, and its r0 (RuntimeError if it fails)."""
    code, memory = ubpf_inputs(program, function, args)
    (work / "ubpf_code.bin").write_bytes(code)
    (work / "ubpf_memory.bin").write_bytes(memory)
    command = [str(runner), str(work / "ubpf_code.bin"), str(work / "ubpf_memory.bin"), str(runs)]
    if program.rodata:
        (work / "ubpf_rodata.bin").write_bytes(program.rodata)
        command += [str(work / "ubpf_rodata.bin"), str(RODATA_BASE)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode < 0:
        raise RuntimeError(f"crashed ({signal.Signals(-done.returncode).name})")
    if done.returncode != 0:
        message = done.stderr.strip().splitlines()
        raise RuntimeError(message[-1] if message else "failed")
    fields = dict(field.split("=", 1) for field in done.stdout.split())
    return int(fields["best_ns"]) / 1e9, int(fields["r0"], 16)


def native_call_only(
    library: ctypes.CDLL, function: str, args: list[int | bytes], runs: int
) -> tuple[float, int]:
    """Best seconds of `runs` native calls, fresh buffers made outside the timed region."""
    fn = getattr(library, function)
    fn.restype = ctypes.c_uint64
    times, result = [], 0
    for _ in range(runs):
        native_args = [
            ctypes.create_string_buffer(a, len(a)) if isinstance(a, bytes) else ctypes.c_uint64(a)
            for a in args
        ]
        start = time.perf_counter()
        result = int(fn(*native_args))
        times.append(time.perf_counter() - start)
    return min(times), result


def bench_ubpf(
    programs, libraries, runner: Path, work: Path, repeat: int, quick: bool, rounds: int
) -> None:
    print("\n| program | JIT (run only) | uBPF JIT | native C (call only) | JIT / uBPF "
          "| uBPF / native | JIT / native |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for case in CASES:
        program, library = programs[case.module], libraries[case.module]
        size = case.size // 16 if quick and case.function != "fib_rec" else case.size
        args = case.args(size)
        # Rounds alternate the three so that a busy spell of a shared host (or one
        # unlucky code placement of a uBPF process) does not fall on one of them only.
        jit_time = native_time = ubpf_time = float("inf")
        ubpf_error = ""
        for _ in range(rounds):
            runs: list[vm.Result] = []  # compiled and warm: bench_cases ran the same program
            for _ in range(repeat):
                result = vm.execute(program, case.function, args, fuel=10**10, engine="jit")
                if result.trap is not None:
                    raise RuntimeError(f"{case.function} on jit: {result.trap}")
                runs.append(result)
            jit_time = min(jit_time, min(r.duration_ns for r in runs) / 1e9)
            jit_r0 = runs[0].return_value
            seconds, native_r0 = native_call_only(library, case.function, args, repeat)
            native_time = min(native_time, seconds)
            if native_r0 != jit_r0:
                raise RuntimeError(f"{case.function}: JIT {jit_r0:#x}, native {native_r0:#x}")
            try:
                seconds, ubpf_r0 = run_ubpf(runner, work, program, case.function, args, repeat)
            except RuntimeError as error:  # reported, not fatal
                ubpf_error = f"uBPF {error}"
                continue
            if ubpf_r0 != jit_r0:
                ubpf_error = f"wrong r0 {ubpf_r0:#x}"
                continue
            ubpf_time = min(ubpf_time, seconds)
        if ubpf_error:
            ubpf_cell, ratios = ubpf_error, "n/a | n/a"
        else:
            ubpf_cell = f"{ubpf_time * 1e3:,.3f} ms"
            ratios = f"{jit_time / ubpf_time:.2f} | {ubpf_time / native_time:.2f}"
        print(
            f"| {case.function}({size}) | {jit_time * 1e3:,.3f} ms | {ubpf_cell} "
            f"| {native_time * 1e3:,.3f} ms | {ratios} | {jit_time / native_time:.2f} |"
        )


def bench_compile(work: Path) -> None:
    from bpfexec.vm.jit import compile_program

    print("\n| module | instructions | tier | JIT compile time | per 1,000 instructions |")
    print("| --- | ---: | --- | ---: | ---: |")
    for source in sorted(PROGRAMS.glob("*.c")):
        data = (work / f"{source.stem}.o").read_bytes()
        for quick in (True, False):
            times = []
            for _ in range(7):  # best of 7: compiles on a shared host vary by 2x
                program = load(data, name=source.name)  # a fresh Program: nothing cached
                times.append(compile_program(program, quick=quick).compile_seconds)
            count = len(program.instructions)
            seconds = min(times)
            print(
                f"| {source.name} | {count:,} | {'quick' if quick else 'optimized'} "
                f"| {seconds * 1e3:.1f} ms | {seconds * 1e3 * 1000 / count:.1f} ms |"
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
    parser.add_argument(
        "--rounds", type=int, default=1, help="uBPF table: alternating rounds (best is kept)"
    )
    parser.add_argument(
        "--ubpf-lib",
        type=Path,
        metavar="DIR",
        help="a uBPF build (libubpf.a, ubpf.h): also compare with uBPF's x86-64 JIT",
    )
    parser.add_argument(
        "--mcpu",
        default="v3",
        choices=["v1", "v2", "v3", "v4"],
        help="eBPF instruction set clang targets (default v3, clang 20's default)",
    )
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bpfexec-bench-") as tmp:
        work = Path(tmp)
        programs, libraries = build(work, options.mcpu)
        bench_cases(programs, libraries, options.repeat, options.quick)
        if options.ubpf_lib:
            runner = build_ubpf_runner(work, options.ubpf_lib)
            bench_ubpf(
                programs, libraries, runner, work, options.repeat, options.quick, options.rounds
            )
        bench_compile(work)
        bench_threads(programs["compute"], 50_000_000)


if __name__ == "__main__":
    main()
