"""Benchmark: the cost of one helper call, by kind of helper and engine, in one run.

    python bench/bench_helpers.py [--calls N] [--python-calls M] [--repeat R]
                                  [--ubpf-lib DIR] [--mcpu v3]

The programs are `bench/programs/helper_calls.c`: `sqrt_sum(n)` calls helper
200 (`sqrti`, an exact integer square root, about 20 ns of work) n times and
`nop_sum(n)` helper 201 (`nop`, which returns its argument: the bare cost of a
call), each input depending on the previous results (8 eBPF instructions a
round besides the call); and an assembly loop calling the built-in
`bpf_ktime_get_ns` (helper 5). The helpers are:

- native: `bench/helpers/sqrti.c` built with `cc -O2 -shared -fPIC`, loaded
  with `HelperRegistry.native` (docs/native-helpers.md);
- Python: the same functions in Python (`math.isqrt`);
- built-in: bpfexec's standard `bpf_ktime_get_ns` (a native twin on the JIT).

Each case runs on the interpreter and the JIT (optimized tier, compiled before
timing); the time is `Result.duration_ns` (the engine's run, without
`prepare`), best of `--repeat`, divided by the calls: a call and its round of
the loop. Side by side, on the same bytecode and helpers: native C running the
same loop through a function pointer, and, with `--ubpf-lib DIR` (a uBPF build,
as for bench_engines.py), uBPF's x86-64 JIT calling the same C helpers. The
interpreter and Python helpers run `--python-calls` calls (they are slow); the
native rows `--calls`. It measures, it never asserts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import helper_baselines as baselines

from bpfexec import vm
from bpfexec.vm.builtin_helpers import standard_helpers
from bpfexec.vm.helpers import HelperRegistry
from bpfexec.vm.jit import compile_program
from bpfexec.vm.loader import load

LIMITS = vm.Limits(max_fuel=10**13, max_helper_calls=10**10)
KTIME_LOOP = b"""
    r6 = r1
    r7 = 0
loop:
    call 5
    r7 += r0
    r6 -= 1
    if r6 != 0 goto loop
    r0 = r7
    exit
"""


@dataclass(frozen=True)
class Case:
    name: str  # the table's row
    program: vm.Program
    function: str
    helpers: HelperRegistry
    many: bool  # runs --calls on the JIT (else --python-calls)
    baseline: str | None  # the C loop / uBPF function with the same calls, if any


def seconds_per_call(case: Case, engine: str, calls: int, repeat: int) -> tuple[float, int]:
    """Best engine time of `repeat` runs, per call, and r0."""
    best, r0 = float("inf"), 0
    for _ in range(repeat):
        result = vm.execute(
            case.program, case.function, [calls], fuel=20 * calls + 1000, helpers=case.helpers,
            limits=LIMITS, engine=engine,
        )  # fmt: skip
        if result.trap is not None:
            raise RuntimeError(f"{case.name} on {engine}: {result.trap}")
        best, r0 = min(best, result.duration_ns / 1e9), result.return_value
    return best / calls, r0


def cases(program: vm.Program, lib: Path) -> list[Case]:
    native = HelperRegistry()
    native.native(str(lib), "sqrti", id=200)
    native.native(str(lib), "nop", id=201)
    python = baselines.python_helpers()
    ktime = load(KTIME_LOOP, name="ktime_loop")
    return [
        Case("sqrti, native", program, "sqrt_sum", native, True, "sqrt_sum"),
        Case("sqrti, Python", program, "sqrt_sum", python, False, "sqrt_sum"),
        Case("nop, native", program, "nop_sum", native, True, "nop_sum"),
        Case("nop, Python", program, "nop_sum", python, False, "nop_sum"),
        Case("ktime, built-in", ktime, "main", standard_helpers(), True, None),
    ]


def fmt(seconds: float) -> str:
    return f"{seconds * 1e9:,.1f} ns" if seconds < 1e-6 else f"{seconds * 1e6:,.2f} µs"


def ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=30_000_000, help="calls of native runs")
    parser.add_argument("--python-calls", type=int, default=300_000,
                        help="calls of interpreter and Python-helper runs")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=5, help="runs per case (best is kept)")
    parser.add_argument("--ubpf-lib", type=Path, metavar="DIR", help="a uBPF build: time "
                        "uBPF's JIT calling the same helpers")  # fmt: skip
    parser.add_argument("--mcpu", default="v3", choices=["v1", "v2", "v3", "v4"])
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bpfexec-bench-helpers-") as tmp:
        work = Path(tmp)
        lib = baselines.build_helpers(work)
        code = baselines.build_program(work, options.mcpu)
        program = load(code, name=baselines.PROGRAM_SOURCE.name)
        # Baselines first: the C loop and uBPF's JIT, per call.
        native_c: dict[str, float] = {}
        c_results: dict[str, int] = {}
        ubpf: dict[str, float] = {}
        for function in baselines.FUNCTIONS:
            seconds, c_results[function] = baselines.native_c_seconds(
                lib, function, options.calls, options.repeat
            )
            native_c[function] = seconds / options.calls
            if options.ubpf_lib:
                seconds, _ = baselines.ubpf_seconds(
                    options.ubpf_lib, work, code, function, options.calls, options.repeat
                )
                ubpf[function] = seconds / options.calls
        print(f"{options.calls:,} calls a native run, {options.python_calls:,} an interpreter "
              f"or Python-helper run; per call, best of {options.repeat}:\n")  # fmt: skip
        print("| helper | interpreter | JIT | JIT / interpreter | native C | uBPF JIT "
              "| JIT / native C | JIT / uBPF |")  # fmt: skip
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for case in cases(program, lib):
            compile_program(case.program)  # the optimized tier, before timing
            interpreter, r0_interpreter = seconds_per_call(
                case, "interpreter", options.python_calls, options.repeat
            )
            calls = options.calls if case.many else options.python_calls
            jit, r0_jit = seconds_per_call(case, "jit", calls, options.repeat)
            expected = (
                r0_interpreter
                if calls == options.python_calls
                else c_results.get(case.baseline or "", r0_jit)
            )
            if r0_jit != expected:
                print(f"warning: {case.name}: the JIT's r0 {r0_jit:#x}, expected {expected:#x}")
            c = native_c.get(case.baseline or "")
            u = ubpf.get(case.baseline or "")
            print(
                f"| {case.name} | {fmt(interpreter)} | {fmt(jit)} | {ratio(jit, interpreter)} "
                f"| {fmt(c) if c else 'n/a'} | {fmt(u) if u else 'n/a'} | {ratio(jit, c)} "
                f"| {ratio(jit, u)} |"
            )


if __name__ == "__main__":
    main()
