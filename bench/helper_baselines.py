"""Baselines for bench/bench_helpers.py: one helper call on uBPF's JIT and in native C.

    python bench/helper_baselines.py [--ubpf-lib DIR] [--n N] [--repeat R] [--mcpu v3]

The program is `bench/programs/helper_calls.c`: `sqrt_sum(n)` calls helper 200
(`sqrti`, floor of the square root) n times and `nop_sum(n)` helper 201 (`nop`,
which returns its argument: the bare cost of a call), each input depending on
the previous results. `bench/helpers/sqrti.c` has both helpers as plain C
functions, which uBPF and bpfexec call alike (`HelperRegistry.native(lib,
"sqrti", id=200)`), and the same two loops in C, which call the helper through
a function pointer.

For bench_helpers.py to import (bench/ on `sys.path`):

- `build_helpers(work)`: that library, built with `cc -O2 -shared -fPIC`;
- `build_program(work, mcpu)`: the program's eBPF object, as bench_engines.py builds it;
- `native_c_seconds(lib, function, n, repeat)`: the C loop's best time and result;
- `ubpf_seconds(lib_dir, work, program, function, n, repeat)`: the same on uBPF's
  x86-64 JIT (`bench/ubpf_runner.c` in its helpers mode, against the uBPF build in
  lib_dir, as `bench_engines.py --ubpf-lib DIR`), which calls the C helpers directly;
- `python_helpers()`, `sqrti_py`, `nop_py`, `reference(function, n)`: the helpers in
  Python and the loops' expected results.

Times are a whole run's (best of `repeat`); divide by n for a call. Run as a
script, it checks that bpfexec's interpreter (Python helpers), native C and uBPF
agree, then prints per-call times for n calls. It measures, it never asserts.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_engines

from bpfexec import vm
from bpfexec.vm.helpers import HelperRegistry
from bpfexec.vm.loader import load

BENCH = Path(__file__).parent
PROGRAM_SOURCE = BENCH / "programs" / "helper_calls.c"
HELPERS_SOURCE = BENCH / "helpers" / "sqrti.c"
FUNCTIONS = {"sqrt_sum": "sqrti", "nop_sum": "nop"}  # loop -> the helper it calls
HELPER_NUMBERS = {"sqrti": 200, "nop": 201}
MASK64 = (1 << 64) - 1


def sqrti_py(x: int) -> int:
    """Helper 200 in Python: floor(sqrt(x))."""
    return math.isqrt(x)


def nop_py(x: int) -> int:
    """Helper 201 in Python: x."""
    return x


def python_helpers() -> HelperRegistry:
    """sqrti (200) and nop (201) as Python helpers."""
    registry = HelperRegistry()
    registry.register(lambda ctx, r1, *_: sqrti_py(r1), id=200, name="sqrti")
    registry.register(lambda ctx, r1, *_: nop_py(r1), id=201, name="nop")
    return registry


def reference(function: str, n: int) -> int:
    """The result of `function` (sqrt_sum or nop_sum) of n, computed in Python."""
    helper = sqrti_py if function == "sqrt_sum" else nop_py
    total = 0
    for i in range(n):
        total = (total + helper(((i * 7919) & MASK64) ^ total)) & MASK64
    return total


def build_helpers(work: Path) -> Path:
    """bench/helpers/sqrti.c as a shared library in `work` (cc -O2 -shared -fPIC)."""
    return bench_engines.compile_shared(HELPERS_SOURCE, work / "libsqrti.so")


def build_program(work: Path, mcpu: str = "v3") -> bytes:
    """bench/programs/helper_calls.c as an eBPF object (clang -O2 -target bpf -mcpu=...)."""
    return bench_engines.compile_ebpf(PROGRAM_SOURCE, work / "helper_calls.o", mcpu).read_bytes()


def native_c_seconds(lib: Path, function: str, n: int, repeat: int) -> tuple[float, int]:
    """Best seconds of `repeat` calls of the C loop `function`(n) of `lib`, and its result."""
    return bench_engines.native_call_only(ctypes.CDLL(str(lib)), function, [n], repeat)


@functools.cache
def _helper_runner(work: Path, lib_dir: Path) -> Path:
    return bench_engines.build_ubpf_runner(work, lib_dir, helpers=HELPERS_SOURCE)


def ubpf_seconds(
    lib_dir: Path, work: Path, program: bytes, function: str, n: int, repeat: int
) -> tuple[float, int]:
    """Best seconds of `repeat` runs of `function`(n) of the eBPF object `program` on
    uBPF's JIT (the uBPF build in lib_dir; the runner is built in `work` once), and r0.
    RuntimeError if uBPF fails."""
    runner = _helper_runner(work, lib_dir)
    loaded = load(program, name=PROGRAM_SOURCE.name)
    return bench_engines.run_ubpf(runner, work, loaded, function, [n], repeat)


def interpreter_result(program: bytes, function: str, n: int) -> int:
    """r0 of `function`(n) on bpfexec's interpreter with the Python helpers."""
    result = vm.execute(
        load(program, name=PROGRAM_SOURCE.name),
        function,
        [n],
        helpers=python_helpers(),
        engine="interpreter",
        fuel=100 * n + 1000,
    )
    if result.trap is not None:
        raise RuntimeError(f"{function} on the interpreter: {result.trap}")
    return result.return_value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ubpf-lib", type=Path, metavar="DIR", help="a uBPF build (as for "
                        "bench_engines.py): also time uBPF's JIT")  # fmt: skip
    parser.add_argument("--n", type=int, default=30_000_000, help="helper calls per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs (best is kept)")
    parser.add_argument("--mcpu", default="v3", choices=["v1", "v2", "v3", "v4"])
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bpfexec-helpers-") as tmp:
        work = Path(tmp)
        lib, program = build_helpers(work), build_program(work, options.mcpu)
        check_n = 10_000
        for function in FUNCTIONS:
            results = {
                "Python": reference(function, check_n),
                "interpreter": interpreter_result(program, function, check_n),
                "native C": native_c_seconds(lib, function, check_n, 1)[1],
            }
            if options.ubpf_lib:
                results["uBPF"] = ubpf_seconds(
                    options.ubpf_lib, work, program, function, check_n, 1
                )[1]
            agree = len(set(results.values())) == 1
            shown = ", ".join(f"{name} {value:#x}" for name, value in results.items())
            print(f"{function}({check_n}): {'agree' if agree else 'DIFFER'}: {shown}")
        n = options.n
        print("\n| helper | calls | native C | uBPF JIT | uBPF / native |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for function, helper in FUNCTIONS.items():
            native, native_r0 = native_c_seconds(lib, function, n, options.repeat)
            native_cell, ubpf_cell, ratio = f"{native / n * 1e9:.2f} ns", "n/a", "n/a"
            if options.ubpf_lib:
                try:
                    ubpf, ubpf_r0 = ubpf_seconds(
                        options.ubpf_lib, work, program, function, n, options.repeat
                    )
                except RuntimeError as error:
                    ubpf_cell = f"uBPF {error}"
                else:
                    mark = "" if ubpf_r0 == native_r0 else f" (r0 {ubpf_r0:#x} != {native_r0:#x})"
                    ubpf_cell, ratio = f"{ubpf / n * 1e9:.2f} ns{mark}", f"{ubpf / native:.2f}"
            print(f"| {helper} ({HELPER_NUMBERS[helper]}) | {n:,} | {native_cell} "
                  f"| {ubpf_cell} | {ratio} |")  # fmt: skip


if __name__ == "__main__":
    main()
