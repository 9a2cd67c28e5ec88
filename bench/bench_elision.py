"""Benchmark: what checking strided accesses once per unrolled group buys.

    python bench/bench_elision.py [--rounds N] [--mcpu v1]

The optimized tier checks an access whose address moves by a fixed step once
per group of unrolled rounds (`vm/jit/induction.py`, `precheck`), and its
copies access memory unchecked. This script builds the programs of
`bench/programs/` as `bench_engines.py` does, compiles each twice, with that
elision and with every access checked (the compiler's strided-access analysis
replaced by one that finds none), and alternates the two over `--rounds`,
keeping each one's best `Result.duration_ns` (the run alone). It measures, it
never asserts. docs/jit.md ("Defence in depth") keeps the latest table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_engines

from bpfexec import vm
from bpfexec.vm.jit import compiler
from bpfexec.vm.loader import load

FUNCTIONS = ("byte_sum", "histogram", "sieve", "matmul", "crc32", "fnv1a", "sha256")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds (best is kept)")
    parser.add_argument("--mcpu", default="v3", choices=["v1", "v2", "v3", "v4"])
    options = parser.parse_args()
    cases = [case for case in bench_engines.CASES if case.function in FUNCTIONS]
    analysis = compiler.strided_accesses
    with tempfile.TemporaryDirectory() as work:
        bench_engines.build(Path(work), options.mcpu)
        variants: dict[bool, dict[str, vm.Program]] = {}
        for elide in (True, False):
            compiler.strided_accesses = analysis if elide else (lambda *_: {})
            variants[elide] = {
                case.module: load((Path(work) / f"{case.module}.o").read_bytes(), name=case.module)
                for case in cases
            }
            for case in cases:  # compile now, under this variant's analysis
                bench_engines.run_vm(variants[elide][case.module], case, 64, "jit")
        compiler.strided_accesses = analysis
    best: dict[tuple[str, bool], int] = {}
    for _ in range(options.rounds):
        for elide, programs in variants.items():
            for case in cases:
                result = bench_engines.run_vm(programs[case.module], case, case.size, "jit")
                key = (case.function, elide)
                best[key] = min(best.get(key, result.duration_ns), result.duration_ns)
    print("| program | checked once per group | every access checked | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for case in cases:
        once, every = best[(case.function, True)], best[(case.function, False)]
        ratio = every / once
        print(f"| {case.function} | {once / 1e6:.2f} ms | {every / 1e6:.2f} ms | {ratio:.2f} |")


if __name__ == "__main__":
    main()
