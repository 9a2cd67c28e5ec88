"""Size and shape limits of the JIT tiers, checked before anything is compiled.

LLVM's optimized code generation is superlinear in the size of one LLVM
function (loop strength reduction, the register coalescer, the machine
scheduler and block placement each grow with the function; see
docs/jit.md, "Compile time against program size"): a 20,000-instruction
branchy function took 40 s where 8,000 took 4. The quick tier (fast
instruction selection and register allocation) stays close to linear. So
each tier takes a module only when every LLVM function it would generate,
and the module as a whole, are within the tier's limits; otherwise the
module gets the tier below (the quick one, else the interpreter), by rule and
at once, not after a timeout.

What is counted is what the compiler translates: every pc entered by a call
(each exported function, each local call target) is one LLVM function made of
the blocks reachable from it without a call (`bpfexec.vm.jit.compiler.build_module`),
so code reachable from several call targets counts once per target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bpfexec.vm import isa
from bpfexec.vm.interpreter import CALL, FALL, Block
from bpfexec.vm.liveness import successors
from bpfexec.vm.program import Program


@dataclass(frozen=True)
class TierLimits:
    """How much code one tier compiles; beyond any limit the module gets the tier below."""

    max_function_instructions: int  # eBPF instructions in one LLVM function
    max_function_blocks: int  # eBPF blocks in one LLVM function
    max_instructions: int  # eBPF instructions of all LLVM functions of the module

    @classmethod
    def of(cls, max_function_instructions: int, max_instructions: int) -> TierLimits:
        """Limits from the two instruction counts; at most one block per two instructions
        of the function limit (the densest branching the benchmarks measured the
        per-instruction cost on was one block per three)."""
        return cls(max_function_instructions, max_function_instructions // 2, max_instructions)


# Optimized tier: at 4,096 instructions per function codegen costs about 0.3 ms an
# instruction on the branchy benchmark (0.2 at 1,000, 0.46 at 8,000, 2.0 at 20,000);
# 16,384 instructions in all is at most about 7 s of one core.
OPTIMIZED_LIMITS = TierLimits.of(max_function_instructions=4096, max_instructions=16384)
# Quick tier: close to linear (0.05 ms an instruction at 10,000, 0.09 at 80,000, IR
# generation included); 131,072 instructions in all is at most about 12 s.
QUICK_LIMITS = TierLimits.of(max_function_instructions=65536, max_instructions=131072)


def tier_limits(quick: bool) -> TierLimits:
    return QUICK_LIMITS if quick else OPTIMIZED_LIMITS


def over_limit(program: Program, blocks: Sequence[Block | None], limits: TierLimits) -> str | None:
    """Why `program` is too big for a tier with `limits`, or None when it is not.

    The walk stops as soon as a limit is passed, so checking costs at most about
    `limits.max_instructions` steps, whatever the program.
    """
    code = program.instructions
    todo = sorted({fn.pc for fn in program.functions}, reverse=True)
    done: set[int] = set()
    total = 0
    while todo:
        entry = todo.pop()
        if entry in done:
            continue
        done.add(entry)
        if not 0 <= entry < len(blocks) or blocks[entry] is None:
            return None  # the compiler refuses it itself (Unsupported)
        seen = {entry}
        work = [entry]
        instructions = 0
        while work:
            block = blocks[work.pop()]
            assert block is not None
            instructions += _instructions(block, code)
            if instructions > limits.max_function_instructions:
                return (
                    f"the function at pc {entry} has more than "
                    f"{limits.max_function_instructions} instructions"
                )
            if total + instructions > limits.max_instructions:
                return f"more than {limits.max_instructions} instructions to compile"
            if len(seen) > limits.max_function_blocks:
                most = limits.max_function_blocks
                return f"the function at pc {entry} has more than {most} blocks"
            if block.kind == CALL:
                todo.append(block.target)
            for pc in successors(block, code):
                if not 0 <= pc < len(blocks) or blocks[pc] is None:
                    return None  # Unsupported, reported by the compiler
                if pc not in seen:
                    seen.add(pc)
                    work.append(pc)
        total += instructions
    return None


def _instructions(block: Block, code: Sequence[isa.Instruction]) -> int:
    """Instruction slots of `block` (an lddw counts as its two slots)."""
    end = block.next_pc if block.kind == FALL else block.end_pc + 1
    return max(1, end - block.pc)
