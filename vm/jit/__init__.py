"""The JIT engine: eBPF compiled to native code with LLVM (llvmlite), as exact as the interpreter.

    from bpfexec.vm.jit import Jit, compile_program
    bpfexec.vm.execute(program, "sum", [100], engine="jit")
    compile_program(program).compile_seconds  # the optimized tier
    compile_program(program, quick=True)  # the first tier: quick to compile

Importing this package needs llvmlite (`pip install bpfexec[jit]`); without it
the import fails with an ImportError that says so, and callers use the
interpreter. Nothing else in `vm` imports this package at import time.

The package is split by concern: `context` (the C struct native code and
Python share), `compiler` (eBPF to LLVM IR), `limits` (how big a module each
tier takes), `runtime` (code generation, running, helper dispatch, traps),
`builtins` (native twins of the built-in memory and time helpers), `worker`
(compile worker processes and the server's fair compile queue). This module
only chooses between native code and the interpreter for one run.
"""

from __future__ import annotations

try:
    import llvmlite  # noqa: F401 (only probing that it is installed)
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the JIT engine needs llvmlite: install bpfexec[jit], or use engine 'interpreter'"
    ) from exc

from bpfexec.vm.interpreter import Interpreter
from bpfexec.vm.jit.runtime import (
    CompileAbandoned,
    CompiledProgram,
    best_compiled,
    compile_best,
    compile_program,
    run_native,
    runs_natively,
)
from bpfexec.vm.machine import Machine

__all__ = [
    "CompileAbandoned",
    "CompiledProgram",
    "Jit",
    "best_compiled",
    "compile_best",
    "compile_program",
]


class Jit:
    """The Engine of native code. Programs or runs it cannot reproduce exactly
    (a trace requested, an unsupported construct) go to the interpreter."""

    name = "jit"

    def run(self, machine: Machine) -> int:
        # The best tier compiled so far (the server compiles both in the background),
        # else the best one the program is within the limits of, now.
        compiled = best_compiled(machine.program) or compile_best(machine.program)
        if runs_natively(compiled, machine):
            return run_native(compiled, machine)
        return Interpreter().run(machine)
