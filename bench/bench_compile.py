"""Benchmark: JIT compile time against program size, on branchy generated code.

    python bench/bench_compile.py [--sizes 2500,5000,10000,20000,40000] [--functions N]
                                  [--tiers quick,optimized] [--phases] [--no-limits]

`branchy(n)` generates an eBPF assembly program of about `n` instructions: one
function (or `--functions N` of equal size, each called once from the entry)
made of units of 32 instructions, each a diamond nested in a diamond, a
short counted loop and a few stack stores and loads, all depending on the
argument so that nothing folds away. It is the shape that made the optimized
tier superlinear: thousands of blocks in one LLVM function.

For each size and tier the script prints the seconds `compile_program` takes
(a fresh Program each time, so nothing is cached). `--phases` splits one
compile into IR generation (Python), parsing, optimization passes and code
generation, in this process. `--no-limits` compiles past the per-tier size rule
(`bpfexec.vm.jit.limits`), which is what "before" measures; without it a program over
a tier's limit is not compiled (the table says which rule refused it).
It measures, it never asserts: tests live in `tests/`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bpfexec.vm.loader import load
from bpfexec.vm.program import Program

UNIT = 32  # instructions per unit


def _unit(k: int) -> list[str]:
    """32 instructions: nested diamonds, a counted loop, stack traffic."""
    return [
        "r2 = r1",
        f"r2 += {k % 97}",
        "r2 &= 15",
        f"if r2 > 7 goto else_{k}",
        "r0 += r2",
        f"if r2 == 3 goto inner_else_{k}",
        "r0 ^= 0x55",
        "r3 = r0",
        "r3 <<= 3",
        "r0 += r3",
        f"goto inner_join_{k}",
        f"inner_else_{k}:",
        "r0 -= 7",
        "r0 *= 3",
        f"inner_join_{k}:",
        f"goto join_{k}",
        f"else_{k}:",
        "r0 *= 5",
        f"if r2 s< 12 goto join_{k}",
        "r0 |= 1",
        "r4 = r0",
        "r4 >>= 2",
        "r0 ^= r4",
        f"join_{k}:",
        f"*(u64 *)(r10 - {8 + 8 * (k % 8)}) = r0",
        "r3 = 0",
        f"loop_{k}:",
        "r0 += r3",
        "r5 = r0",
        "r5 &= 0xff",
        f"if r5 == 0x42 goto skip_{k}",
        "r0 += 1",
        f"skip_{k}:",
        "r3 += 1",
        f"if r3 < {2 + k % 3} goto loop_{k}",
        f"r4 = *(u64 *)(r10 - {8 + 8 * (k % 8)})",
        "r0 ^= r4",
        "r1 += 1",
    ]


def branchy(instructions: int, functions: int = 1) -> str:
    """Assembly text of about `instructions` instructions in `functions` functions."""
    units = max(1, instructions // UNIT)
    per_function = max(1, units // functions)
    lines = ["main:", "r6 = r1", "r7 = 0"]
    for f in range(functions):
        lines += ["r1 = r6", f"call fn_{f}", "r7 += r0"]
    lines += ["r0 = r7", "exit"]
    k = 0
    for f in range(functions):
        lines += [f"fn_{f}:", "r0 = 0"]
        for _ in range(per_function):
            lines += _unit(k)
            k += 1
        lines.append("exit")
    return "\n".join(lines) + "\n"


def program(instructions: int, functions: int = 1) -> Program:
    text = branchy(instructions, functions).encode()
    return load(text, f"branchy-{instructions}")


def time_compile(prog: Program, quick: bool, enforce: bool) -> tuple[float, str]:
    """Seconds to compile `prog` to `quick`'s tier in this process, and any fallback."""
    from bpfexec.vm.jit import runtime

    start = time.perf_counter()
    if enforce:
        compiled = runtime.compile_program(prog, quick=quick)
        return time.perf_counter() - start, compiled.fallback
    runtime._native_code(prog, runtime.FRAME_BYTES, quick)
    return time.perf_counter() - start, ""


def phases(prog: Program, quick: bool) -> dict[str, float]:
    """One compile split into its phases (the same steps as `runtime._native_code`)."""
    import llvmlite.binding as llvm

    from bpfexec.vm.jit import runtime
    from bpfexec.vm.jit.compiler import build_module

    times: dict[str, float] = {}
    start = time.perf_counter()
    blocks = runtime._interpreter_blocks(prog)
    module = build_module(
        prog, blocks, [fn.pc for fn in prog.functions], runtime.FRAME_BYTES, optimized=not quick
    )
    times["ir (python)"] = time.perf_counter() - start
    runtime._prepare_llvm()
    start = time.perf_counter()
    native = llvm.parse_assembly(module.text)
    native.verify()
    times["parse"] = time.perf_counter() - start
    machine = runtime._target_machine(quick)
    start = time.perf_counter()
    runtime._optimize(native, machine, quick)
    times["passes"] = time.perf_counter() - start
    start = time.perf_counter()
    machine.emit_object(native)
    times["codegen"] = time.perf_counter() - start
    times["ir lines"] = module.text.count("\n")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2500,5000,10000,20000,40000")
    parser.add_argument("--functions", type=int, default=1)
    parser.add_argument("--tiers", default="quick,optimized")
    parser.add_argument("--phases", action="store_true", help="split each compile into phases")
    parser.add_argument("--no-limits", action="store_true", help="compile past the tier limits")
    parser.add_argument("--max-seconds", type=float, default=600.0,
                        help="skip larger sizes of a tier once one took longer")  # fmt: skip
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    tiers = args.tiers.split(",")
    print("| instructions | blocks | tier | seconds | ms / 1k insns | note |")
    print("| ---: | ---: | --- | ---: | ---: | --- |")
    slow: set[str] = set()
    for size in sizes:
        prog = program(size, args.functions)
        count = len(prog.instructions)
        from bpfexec.vm.jit import runtime

        blocks = sum(b is not None for b in runtime._interpreter_blocks(prog))
        for tier in tiers:
            if tier in slow:
                print(f"| {count} | {blocks} | {tier} | skipped | | slower than --max-seconds |")
                continue
            quick = tier == "quick"
            if args.phases:
                split = phases(prog, quick)
                seconds = sum(v for k, v in split.items() if k != "ir lines")
                note = ", ".join(
                    f"{k} {v:.0f}" if k == "ir lines" else f"{k} {v:.2f}s" for k, v in split.items()
                )
            else:
                seconds, note = time_compile(prog, quick, not args.no_limits)
            per_k = seconds / count * 1000 * 1000
            print(
                f"| {count} | {blocks} | {tier} | {seconds:.2f} | {per_k:.0f} | {note} |",
                flush=True,
            )
            if seconds > args.max_seconds:
                slow.add(tier)


if __name__ == "__main__":
    main()
