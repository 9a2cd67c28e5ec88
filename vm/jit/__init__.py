"""The JIT engine: eBPF compiled to native code with LLVM (llvmlite), as exact as the interpreter.

    from vm.jit import Jit, compile_program
    vm.execute(program, "sum", [100], engine="jit")
    compile_program(program).compile_seconds  # the optimized tier
    compile_program(program, quick=True)  # the first tier: quick to compile

Importing this package needs llvmlite (`pip install bpfexec[jit]`); without it
the import fails with an ImportError that says so, and callers use the
interpreter. Nothing else in `vm` imports this package at import time.

The package is split by concern: `context` (the C struct native code and
Python share), `compiler` (eBPF to LLVM IR), `runtime` (code generation,
running, helper dispatch, traps). This module only chooses between native code
and the interpreter for one run.
"""

from __future__ import annotations

try:
    import llvmlite  # noqa: F401 (only probing that it is installed)
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the JIT engine needs llvmlite: install bpfexec[jit], or use engine 'interpreter'"
    ) from exc

from vm.interpreter import Interpreter
from vm.jit.runtime import (
    CompiledProgram,
    best_compiled,
    compile_program,
    run_native,
    runs_natively,
)
from vm.machine import Machine

__all__ = ["CompiledProgram", "Jit", "best_compiled", "compile_program"]


class Jit:
    """The Engine of native code. Programs or runs it cannot reproduce exactly
    (a trace requested, an unsupported construct) go to the interpreter."""

    name = "jit"

    def run(self, machine: Machine) -> int:
        # The best tier compiled so far (the server compiles both in the background),
        # else the optimized one, now.
        compiled = best_compiled(machine.program) or compile_program(machine.program)
        if runs_natively(compiled, machine):
            return run_native(compiled, machine)
        return Interpreter().run(machine)
