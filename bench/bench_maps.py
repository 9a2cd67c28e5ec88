"""Benchmark: map-heavy programs on both engines, per map operation, in one run.

    python bench/bench_maps.py [--ops N] [--python-ops M] [--repeat R]

The programs are libbpf-style C, `bench/programs/maps_*.c`, built with
`clang -O2 -g -target bpf -I/usr/include/$(gcc -print-multiarch)` as libbpf
programs are, each a loop of `n` rounds around one map operation on
pseudo-random keys (an LCG):

- `maps_array.c`: an array histogram, a lookup and an increment of one of 256
  counters (the JIT looks arrays up inline: docs/jit.md, "Inline array lookups");
- `maps_hash.c`: hash counting over 10,000 distinct keys, a lookup and an
  increment, or an update the first time a key is seen (the JIT probes the
  map's index inline: docs/jit.md, "Inline hash lookups"; the 10,000 updates
  call the Python helper);
- `maps_lpm.c`: an LPM trie of 64 routes, a longest-prefix lookup of an address;
- `maps_ringbuf.c`: a 16-byte record written with `bpf_ringbuf_output`.

A program whose map type or helper this VM does not have yet is skipped with a
note. Each runs on the interpreter and on the JIT (optimized tier, compiled
before timing) on fresh maps; the time is `Result.duration_ns` (the engine's
run, without `prepare`), best of `--repeat`, divided by the rounds. The JIT
runs `--ops` rounds where its map operation stays in native code (array and hash),
`--python-ops` where the helper is Python (as the interpreter always does).
Beside them, where it makes sense, the same loop in native C (`cc -O2
-shared`, called through ctypes): a plain array, and a small open-addressing
hash table. Every engine's r0 (the work's checksum) is compared. It measures,
it never asserts.
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bpfexec import vm
from bpfexec.vm.errors import LinkError, LoadError
from bpfexec.vm.jit import compile_program
from bpfexec.vm.loader import load

PROGRAMS = Path(__file__).parent / "programs"
LIMITS = vm.Limits(max_fuel=10**13, max_helper_calls=10**10)

# The loops of maps_array.c and maps_hash.c in plain C, with the same LCG and keys.
NATIVE_C = r"""
#include <stdint.h>
#include <string.h>

static uint64_t hist[256];

uint64_t array_histogram(uint64_t n) {
  uint64_t x = 12345, seen = 0;
  memset(hist, 0, sizeof(hist));
  for (uint64_t i = 0; i < n; i++) {
    x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    uint32_t key = x >> 56;
    seen += ++hist[key];
  }
  return seen;
}

#define SLOTS 16384 /* a power of two above the 10,000 keys: linear probing */
static uint32_t keys[SLOTS]; /* key + 1; 0 is an empty slot */
static uint64_t counts[SLOTS];

uint64_t hash_count(uint64_t n) {
  uint64_t x = 12345, seen = 0;
  memset(keys, 0, sizeof(keys));
  for (uint64_t i = 0; i < n; i++) {
    x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    uint32_t key = (x >> 33) % 10000;
    uint32_t at = (key * 2654435761u) & (SLOTS - 1);
    while (keys[at] && keys[at] != key + 1)
      at = (at + 1) & (SLOTS - 1);
    if (keys[at]) {
      seen += ++counts[at];
    } else {
      keys[at] = key + 1;
      counts[at] = 1;
      seen += 1;
    }
  }
  return seen;
}
"""


@dataclass(frozen=True)
class Case:
    module: str  # bench/programs/<module>.c
    function: str
    operation: str  # what one round does, for the table
    native: bool  # the JIT keeps the map operation in native code: run --ops rounds
    baseline: str | None  # the function of NATIVE_C that does the same, if any


CASES = [
    Case("maps_array", "array_histogram", "array lookup + increment", True, "array_histogram"),
    Case("maps_hash", "hash_count", "hash lookup + increment (10k keys)", True, "hash_count"),
    Case("maps_lpm", "lpm_route", "LPM trie lookup (64 routes)", False, None),
    Case("maps_ringbuf", "ringbuf_output", "ring buffer output, 16 bytes", False, None),
]


def multiarch() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        return ""
    return subprocess.run([gcc, "-print-multiarch"], capture_output=True, text=True).stdout.strip()


def build_ebpf(source: Path, out: Path) -> bytes:
    """clang -O2 -g -target bpf, as a libbpf program is built."""
    clang = shutil.which("clang")
    if clang is None:
        sys.exit("needs clang (for eBPF) and libbpf-dev (bpf/bpf_helpers.h)")
    subprocess.run(
        [clang, "-O2", "-g", "-target", "bpf", f"-I/usr/include/{multiarch()}", "-c",
         str(source), "-o", str(out)],
        check=True,
    )  # fmt: skip
    return out.read_bytes()


def build_native(work: Path) -> ctypes.CDLL:
    """NATIVE_C with cc -O2 -shared."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        sys.exit("needs a system C compiler (cc)")
    source, lib = work / "maps_native.c", work / "libmaps_native.so"
    source.write_text(NATIVE_C)
    subprocess.run([cc, "-O2", "-shared", "-fPIC", str(source), "-o", str(lib)], check=True)
    library = ctypes.CDLL(str(lib))
    for name in ("array_histogram", "hash_count"):
        function = getattr(library, name)
        function.argtypes, function.restype = [ctypes.c_uint64], ctypes.c_uint64
    return library


def engine_seconds(program: vm.Program, case: Case, engine: str, rounds: int, repeat: int):
    """Best engine time of `repeat` runs (fresh maps each), per round, and r0."""
    best, r0 = float("inf"), 0
    for _ in range(repeat):
        result = vm.execute(program, case.function, [rounds], fuel=40 * rounds + 10_000,
                            limits=LIMITS, engine=engine)  # fmt: skip
        if result.trap is not None:
            raise RuntimeError(f"{case.function} on {engine}: {result.trap}")
        best, r0 = min(best, result.duration_ns / 1e9), result.return_value
    return best / rounds, r0


def native_seconds(library: ctypes.CDLL, name: str, rounds: int, repeat: int):
    """Best time of `repeat` calls of the native loop, per round, and its result."""
    function = getattr(library, name)
    best, r0 = float("inf"), 0
    for _ in range(repeat):
        start = time.perf_counter_ns()
        r0 = function(rounds)
        best = min(best, (time.perf_counter_ns() - start) / 1e9)
    return best / rounds, r0


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds * 1e9:,.1f} ns" if seconds < 1e-6 else f"{seconds * 1e6:,.2f} µs"


def ratio(a: float, b: float | None) -> str:
    return f"{a / b:,.2f}" if b else ""


def speed_up(interpreter: float, jit: float) -> str:
    times = interpreter / jit
    return f"{times:,.0f}x" if times >= 10 else f"{times:.1f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=10_000_000,
                        help="rounds of JIT runs whose map operation is native")  # fmt: skip
    parser.add_argument("--python-ops", type=int, default=200_000,
                        help="rounds of interpreter runs and Python-helper JIT runs")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=5, help="runs per case (best is kept)")
    options = parser.parse_args()
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="bpfexec-bench-maps-") as tmp:
        work = Path(tmp)
        library = build_native(work)
        for case in CASES:
            code = build_ebpf(PROGRAMS / f"{case.module}.c", work / f"{case.module}.o")
            try:
                program = load(code, name=f"{case.module}.o")
                vm.execute(program, case.function, [1], limits=LIMITS)  # helpers linked?
            except (LoadError, LinkError) as exc:
                notes.append(f"{case.module}.c skipped: {str(exc).splitlines()[0]}")
                continue
            compile_program(program)  # the optimized tier, before timing
            rounds = options.ops if case.native else options.python_ops
            interpreter, r0_interpreter = engine_seconds(
                program, case, "interpreter", options.python_ops, options.repeat
            )
            jit, r0_jit = engine_seconds(program, case, "jit", rounds, options.repeat)
            jit_small = r0_jit
            if rounds != options.python_ops:  # the checksum of the interpreter's rounds
                _, jit_small = engine_seconds(program, case, "jit", options.python_ops, 1)
            if jit_small != r0_interpreter:
                notes.append(f"{case.function}: the JIT's r0 {jit_small} differs from the "
                             f"interpreter's {r0_interpreter}")  # fmt: skip
            native = None
            if case.baseline:
                native, r0_native = native_seconds(library, case.baseline, rounds, options.repeat)
                if r0_native != r0_jit:
                    notes.append(f"{case.function}: native C's r0 {r0_native} differs from "
                                 f"the JIT's {r0_jit}")  # fmt: skip
            rows.append(
                f"| {case.module}.c | {case.operation} | {fmt(interpreter)} | {fmt(jit)} "
                f"| {fmt(native)} | {speed_up(interpreter, jit)} | {ratio(jit, native)} |"
            )
    print(f"Per round (one map operation and its loop), best of {options.repeat}; "
          f"interpreter {options.python_ops:,} rounds, JIT {options.ops:,} where the "
          f"operation is native and {options.python_ops:,} otherwise:\n")  # fmt: skip
    print("| program | map operation | interpreter | JIT | native C "
          "| JIT speed-up over the interpreter | JIT / native C |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    for note in notes:
        print(f"\nnote: {note}")


if __name__ == "__main__":
    main()
