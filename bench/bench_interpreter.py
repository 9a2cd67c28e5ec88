"""Interpreter speed: instructions per second on compute-bound programs.

    python bench/bench_interpreter.py [--seconds 2]

Each program runs repeatedly for about `--seconds`; the figure is fuel used
(instructions executed) divided by the time inside `execute()`. Prints a
markdown table. Programs are assembly so the benchmark needs no compiler.
"""

from __future__ import annotations

import argparse

from bpfexec import vm
from bpfexec.vm.loader import load

PROGRAMS: dict[str, tuple[str, tuple[int | bytes, ...]]] = {
    # Arithmetic and a branch per iteration: sum of i*i mod 7.
    "alu loop": (
        """
        r0 = 0
        loop:
        r2 = r1
        r2 *= r1
        r2 %= 7
        r0 += r2
        r1 += -1
        if r1 != 0 goto loop
        exit
        """,
        (200_000,),
    ),
    # Byte loads over an argument buffer.
    "byte sum": (
        """
        r0 = 0
        r3 = r1
        r3 += r2
        loop:
        r4 = *(u8 *)(r1 + 0)
        r0 += r4
        r1 += 1
        if r1 < r3 goto loop
        exit
        """,
        (bytes(range(256)) * 1024, 256 * 1024),
    ),
    # Recursive local calls: fib(20).
    "recursive fib": (
        """
        main:
        call fib
        exit
        fib:
        r0 = r1
        if r1 < 2 goto done
        r6 = r1
        r1 += -1
        call fib
        r7 = r0
        r1 = r6
        r1 += -2
        call fib
        r0 += r7
        done:
        exit
        """,
        (20,),
    ),
}


def measure(engine: str, seconds: float) -> list[tuple[str, int, float]]:
    rows = []
    for name, (text, args) in PROGRAMS.items():
        program = load(text.encode(), name=name)
        vm.execute(program, None, args, engine=engine)  # warm-up: decode or compile once
        instructions, elapsed = 0, 0.0
        while elapsed < seconds:
            result = vm.execute(program, None, args, engine=engine, fuel=10**9)
            assert result.trap is None, result.trap
            instructions += result.fuel_used
            elapsed += result.duration_ns / 1e9
        rows.append((name, instructions, instructions / elapsed))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--engine", default="interpreter")
    args = parser.parse_args()
    print(f"| program ({args.engine}) | instructions | instructions/s |")
    print("| --- | ---: | ---: |")
    for name, count, rate in measure(args.engine, args.seconds):
        print(f"| {name} | {count:,} | {rate / 1e6:.2f} M |")


if __name__ == "__main__":
    main()
