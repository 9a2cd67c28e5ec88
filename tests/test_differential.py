"""The JIT against the interpreter: the same program, the same inputs, the same Result.

Random programs built from `bpfexec.vm.isa` (hypothesis) and every real program of the
suite (the C fixtures, the instruction cases of `tests/data/`) run on both
engines; r0, fuel used, trap (kind, pc, message), log and final buffers must be
identical. The interpreter is the reference.

CI runs a short search; `BPFEXEC_DIFFERENTIAL_EXAMPLES=20000 pytest
tests/test_differential.py` runs a long one (see docs/jit.md).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

pytest.importorskip("llvmlite")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from seed_helpers import registry as seed_registry  # noqa: E402
from support import FIB, TWO_PATHS, inner_loops  # noqa: E402
from test_instructions import BUDGET, CASE_FILES, parse_case  # noqa: E402

from bpfexec import vm  # noqa: E402
from bpfexec.vm import isa  # noqa: E402
from bpfexec.vm.errors import Trap, TrapKind  # noqa: E402
from bpfexec.vm.helpers import Helper, HelperChain, HelperRegistry  # noqa: E402
from bpfexec.vm.isa import Instruction  # noqa: E402
from bpfexec.vm.jit import compile_program  # noqa: E402
from bpfexec.vm.loader import load  # noqa: E402
from bpfexec.vm.memory import STACK_BASE, buffer_base  # noqa: E402
from bpfexec.vm.program import Function, HelperRef, Program  # noqa: E402

EXAMPLES = int(os.environ.get("BPFEXEC_DIFFERENTIAL_EXAMPLES", "150"))
TIERS = ("optimized", "quick")
C_FIXTURES = sorted((Path(__file__).parent / "fixtures" / "c").glob("*.c"))
MASK64 = (1 << 64) - 1


def outcome(result: vm.Result) -> dict[str, object]:
    """Everything observable about a run except its duration."""
    trap = result.trap.to_dict() if result.trap else None
    return {
        "r0": result.return_value,
        "fuel_used": result.fuel_used,
        "trap": trap,
        "log": result.log,
        "buffers": result.buffers,
    }


def run(program: Program, function: str | None, args, engine: str, **kw) -> dict[str, object]:
    try:
        return outcome(vm.execute(program, function, args, engine=engine, **kw))
    except Exception as exc:  # whatever the interpreter raises, the JIT must raise too
        return {"raised": type(exc).__name__, "message": str(exc)}


def both(program: Program, function: str | None, args, **kw) -> dict[str, object]:
    """Run on both engines, assert they agree, return the common outcome."""
    expected = run(program, function, args, "interpreter", **kw)
    actual = run(program, function, args, "jit", **kw)
    assert actual == expected
    return expected


# -- helpers the random programs call -----------------------------------------------

helpers = HelperRegistry()


@helpers.helper(id=1, name="mix")
def helper_mix(ctx, a, b, c, d, e):
    return (a * 31 + b * 17 + c * 7 + d * 3 + e) ^ 0x5DEECE66D


@helpers.helper(id=2, name="costly", cost=7)
def helper_costly(ctx, a, b, c, d, e):
    return a + 1


@helpers.helper(id=3, name="picky")
def helper_picky(ctx, a, b, c, d, e):
    if b & 7 == 7:
        raise ValueError("odd input")
    if b & 7 == 6:
        raise Trap(TrapKind.MEMORY_FAULT, "picky refuses")
    return b >> 1


@helpers.helper(id=4, name="poke")
def helper_poke(ctx, a, b, c, d, e):
    """Writes through VM memory and logs: the engines must see each other's bytes."""
    ctx.write(a, (b & MASK64).to_bytes(8, "little"))
    ctx.log(f"poke {a:#x} {ctx.read(a, 8).hex()}")
    return int.from_bytes(ctx.read(a, 4), "little")


class AnyHelper:
    """Resolves every helper a fixture names, so each one links."""

    def resolve(self, ref: HelperRef) -> Helper | None:
        def fn(ctx, a, b, c, d, e):
            ctx.log(f"{ref} {a:#x} {b:#x}")
            return (a ^ b) + 1

        return Helper(fn, ref.number, ref.name)


# -- random programs ------------------------------------------------------------------

VALUES = st.one_of(
    st.sampled_from(
        [0, 1, 2, 7, 31, 32, 33, 63, 64, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
         1 << 63, MASK64, MASK64 - 1, 0x100000000]
    ),
    st.integers(0, MASK64),
)  # fmt: skip
IMMEDIATES = st.one_of(
    st.sampled_from([0, 1, -1, 2, 31, 32, 63, 64, -(1 << 31), (1 << 31) - 1, 8, -8]),
    st.integers(-(1 << 31), (1 << 31) - 1),
)
DST = st.sampled_from([0, 2, 3, 4, 5, 6, 7, 8, 9])  # r1 keeps the buffer, r10 the frame
SRC = st.integers(0, 10)
ALU_OPS = [isa.ADD, isa.SUB, isa.MUL, isa.DIV, isa.OR, isa.AND, isa.LSH, isa.RSH,
           isa.MOD, isa.XOR, isa.MOV, isa.ARSH]  # fmt: skip
CONDITIONS = [isa.JEQ, isa.JGT, isa.JGE, isa.JSET, isa.JNE, isa.JSGT, isa.JSGE, isa.JLT,
              isa.JLE, isa.JSLT, isa.JSLE]  # fmt: skip
SIZES = [isa.B, isa.H, isa.W, isa.DW]
BUFFER = 64


@st.composite
def alu(draw) -> list[Instruction]:
    cls = draw(st.sampled_from([isa.ALU, isa.ALU64]))
    dst = draw(DST)
    kind = draw(st.sampled_from(["op", "op", "op", "signed", "neg", "end", "movsx"]))
    if kind == "neg":
        return [Instruction(cls | isa.NEG, dst)]
    if kind == "end":
        source = isa.TO_BE if cls == isa.ALU64 else draw(st.sampled_from([isa.TO_LE, isa.TO_BE]))
        return [Instruction(cls | isa.END | source, dst, imm=draw(st.sampled_from([16, 32, 64])))]
    if kind == "movsx":
        bits = draw(st.sampled_from([8, 16] if cls == isa.ALU else [8, 16, 32]))
        return [Instruction(cls | isa.MOV | isa.X, dst, draw(SRC), offset=bits)]
    op = draw(st.sampled_from([isa.DIV, isa.MOD] if kind == "signed" else ALU_OPS))
    offset = 1 if kind == "signed" else 0
    if draw(st.booleans()):
        return [Instruction(cls | op | isa.X, dst, draw(SRC), offset=offset)]
    return [Instruction(cls | op | isa.K, dst, imm=draw(IMMEDIATES), offset=offset)]


@st.composite
def memory(draw) -> list[Instruction]:
    size = draw(st.sampled_from(SIZES))
    # Mostly in bounds (buffer in r1, the frame below r10), sometimes not.
    base = draw(st.sampled_from([1, 1, 1, 10, 10, 10, 0]))
    if base == 10:
        offset = draw(st.one_of(st.integers(-512, -8), st.integers(-520, 8)))
    elif base == 1:
        offset = draw(st.one_of(st.integers(0, BUFFER - 8), st.integers(-4, BUFFER + 4)))
    else:
        offset = draw(st.integers(-8, 8))
    kind = draw(st.sampled_from(["load", "loadsx", "store", "store_imm", "atomic"]))
    if kind == "load" or (kind == "loadsx" and size == isa.DW):
        return [Instruction(isa.LDX | isa.MEM | size, draw(DST), base, offset)]
    if kind == "loadsx":
        return [Instruction(isa.LDX | isa.MEMSX | size, draw(DST), base, offset)]
    if kind == "store":
        return [Instruction(isa.STX | isa.MEM | size, base, draw(SRC), offset)]
    if kind == "store_imm":
        return [Instruction(isa.ST | isa.MEM | size, base, 0, offset, draw(IMMEDIATES))]
    code = draw(st.sampled_from(sorted(isa.ATOMIC_OPS)))
    size = draw(st.sampled_from([isa.W, isa.DW]))
    return [Instruction(isa.STX | isa.ATOMIC | size, base, draw(DST), offset, code)]


@st.composite
def call(draw) -> list[Instruction]:
    kind = draw(st.sampled_from(["helper", "helper", "callx", "local"]))
    if kind == "helper":
        return [Instruction(isa.OP_CALL, imm=draw(st.sampled_from([1, 2, 3, 4])))]
    if kind == "callx":
        reg = draw(DST)
        number = draw(st.sampled_from([1, 2, 4, 9]))
        return [Instruction(isa.ALU64 | isa.MOV | isa.K, reg, imm=number),
                Instruction(isa.OP_CALLX, reg)]  # fmt: skip
    return [Instruction(isa.OP_CALL, src=isa.CALL_LOCAL, imm=0)]  # target patched below


@st.composite
def jump(draw) -> tuple[str, Instruction]:
    cls = draw(st.sampled_from([isa.JMP, isa.JMP32]))
    op = draw(st.sampled_from([*CONDITIONS, isa.JA]))
    if op == isa.JA:
        return "ja", Instruction(isa.JMP | isa.JA)
    if draw(st.booleans()):
        return "cond", Instruction(cls | op | isa.X, draw(SRC), draw(SRC))
    return "cond", Instruction(cls | op | isa.K, draw(SRC), imm=draw(IMMEDIATES))


@st.composite
def programs(draw) -> tuple[Program, int, int]:
    """A main function and a callee; jumps land on instruction starts; may loop."""
    items: list[list[Instruction] | tuple[str, Instruction, int]] = []
    for reg in (0, 2, 3, 4, 5, 6, 7, 8, 9):  # interesting register values first
        items.append(list(isa.lddw_pair(reg, draw(VALUES))))
    body = draw(st.integers(1, 30))
    for _ in range(body):
        kind = draw(st.sampled_from(["alu", "alu", "alu", "mem", "mem", "call", "jump", "exit"]))
        if kind == "alu":
            items.append(draw(alu()))
        elif kind == "exit":  # an exit block before blocks that later ones jump to
            items.append([Instruction(isa.OP_EXIT)])
        elif kind == "mem":
            items.append(draw(memory()))
        elif kind == "call":
            items.append(draw(call()))
        else:
            how, insn = draw(jump())
            # Targets are item indices; mostly forward, sometimes a loop back.
            target = draw(st.integers(0, body + 9))
            items.append((how, insn, target))
    items.append([Instruction(isa.OP_EXIT)])
    main_items = len(items)
    callee = [draw(alu()) for _ in range(draw(st.integers(0, 4)))]
    if draw(st.booleans()):
        callee.append(draw(memory()))
    if draw(st.integers(0, 3)) == 0:
        callee.append([Instruction(isa.OP_CALL, src=isa.CALL_LOCAL, imm=0)])  # recursion
    items += [*callee, [Instruction(isa.OP_EXIT)]]

    starts, pc = [], 0
    for item in items:
        starts.append(pc)
        pc += len(item) if isinstance(item, list) else 1
    callee_pc = starts[main_items]
    code: list[Instruction] = []
    for index, item in enumerate(items):
        here = starts[index]
        if isinstance(item, tuple):
            how, insn, target = item
            offset = starts[min(target, main_items - 1)] - here - 1
            code.append(Instruction(insn.opcode, insn.dst, insn.src, offset, insn.imm))
            continue
        for insn in item:
            if insn.opcode == isa.OP_CALL and insn.src == isa.CALL_LOCAL:
                insn = Instruction(isa.OP_CALL, src=isa.CALL_LOCAL, imm=callee_pc - len(code) - 1)
            code.append(insn)
    functions = (
        Function("main", 0, callee_pc),
        Function("callee", callee_pc, len(code) - callee_pc, exported=False),
    )
    calls = {
        pc: HelperRef(number=insn.imm)
        for pc, insn in enumerate(code)
        if insn.opcode == isa.OP_CALL and insn.src == isa.CALL_HELPER
        and (pc == 0 or code[pc - 1].opcode != isa.LDDW)
    }  # fmt: skip
    program = Program(tuple(code), functions, helper_calls=calls, name="random")
    return program, draw(st.sampled_from([40, 300, 3000])), draw(st.sampled_from([2, 4, 64]))


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(programs(), st.binary(min_size=BUFFER, max_size=BUFFER), st.sampled_from(TIERS))
def test_random_programs_agree(generated, buffer, tier):
    program, fuel, depth = generated
    if tier == "quick":
        compile_program(program, quick=True)
    limits = vm.Limits(max_call_depth=depth)
    both(program, "main", [buffer], fuel=fuel, helpers=helpers, limits=limits)


@st.composite
def counted_loops(draw) -> tuple[Program, int]:
    """An inner loop the optimized tier unrolls: r6 counts the rounds down, the body
    is straight-line code with forward jumps inside it and out of it, and sometimes a
    second jump back to the head from the middle of the body. The buffer pointer r1
    may walk (and walk off the buffer) as the loop goes round, by steps up to 2^63,
    and addresses may be computed from the round counter r6 (strided accesses, which
    a group checks once for all its rounds: `bpfexec.vm.jit.induction`)."""
    code = [*isa.lddw_pair(6, draw(st.integers(0, 40)))]
    far = [1 << 32, -(1 << 32), (1 << 32) - 1, 1 - (1 << 32), 1 << 63, 64, -64]
    step = draw(st.one_of(st.integers(-4, 8), st.sampled_from(far)))
    code += isa.lddw_pair(9, step & MASK64)  # a pointer step
    for reg in (0, 2, 3, 7):
        code += isa.lddw_pair(reg, draw(VALUES))
    head = len(code)
    body: list[list[Instruction] | tuple[str, Instruction, str]] = []
    for _ in range(draw(st.integers(1, 8))):
        kinds = ["alu", "alu", "mem", "mem", "indexed", "step", "skip", "out", "back"]
        kind = draw(st.sampled_from(kinds))
        if kind == "alu":
            body.append(draw(alu()))
        elif kind == "indexed":  # r5 = r1 + (r6 << scale) (+ r9), then an access at r5
            scale = draw(st.integers(0, 3))
            item = [
                Instruction(isa.ALU64 | isa.MOV | isa.X, 5, 6),
                Instruction(isa.ALU64 | isa.LSH | isa.K, 5, imm=scale),
                Instruction(isa.ALU64 | isa.ADD | isa.X, 5, 1),
            ]
            if draw(st.booleans()):
                item.append(Instruction(isa.ALU64 | isa.ADD | isa.X, 5, 9))
            size = draw(st.sampled_from(SIZES))
            offset = draw(st.integers(-8, BUFFER))
            if draw(st.booleans()):
                item.append(Instruction(isa.LDX | isa.MEM | size, 4, 5, offset))
            else:
                item.append(Instruction(isa.STX | isa.MEM | size, 5, 7, offset))
            body.append(item)
        elif kind == "step":  # walk the buffer pointer, by a constant or by r9
            if draw(st.booleans()):
                body.append([Instruction(isa.ALU64 | isa.ADD | isa.X, 1, 9)])
            else:
                body.append(
                    [Instruction(isa.ALU64 | isa.ADD | isa.K, 1, imm=draw(st.integers(-4, 8)))]
                )
        elif kind == "mem":
            body.append(draw(memory()))
        else:
            _, insn = draw(jump())
            body.append((kind, insn, ""))
    body.append([Instruction(isa.ALU64 | isa.SUB | isa.K, 6, imm=1)])
    latch = Instruction(isa.JMP | isa.JNE | isa.K, 6, imm=0)
    body.append(("back", latch, ""))
    sizes = [len(item) if isinstance(item, list) else 1 for item in body]
    end = head + sum(sizes)  # the exit after the loop
    for index, item in enumerate(body):
        here = len(code)
        if isinstance(item, list):
            code += item
            continue
        kind, insn, _ = item
        if kind == "skip":  # forward, inside the body
            target = here + 1 + sum(sizes[index + 1 : draw(st.integers(index + 1, len(body)))])
        else:
            target = {"out": end, "back": head}[kind]
        code.append(Instruction(insn.opcode, insn.dst, insn.src, target - here - 1, insn.imm))
    code += [Instruction(isa.ALU64 | isa.ADD | isa.X, 0, 6), Instruction(isa.OP_EXIT)]
    program = Program(tuple(code), (Function("main", 0, len(code)),), name="loop")
    return program, draw(st.integers(1, 1500))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(counted_loops(), st.binary(min_size=BUFFER, max_size=BUFFER))
def test_random_loops_agree(generated, buffer):
    """Unrolled loops: fuel running out, faults and exits at every point of a group."""
    program, fuel = generated
    both(program, "main", [buffer], fuel=fuel)


# Inner loops the optimized tier unrolls (one block, and two paths of different
# costs), and recursion, where a call checks the fuel of the callee's first block.
SWEPT = {
    "one block": """
        r0 = 0
    loop:
        r0 += r1
        r1 -= 1
        if r1 != 0 goto loop
        exit
    """,
    "two paths": TWO_PATHS,
    "recursion": FIB,
}


@pytest.mark.parametrize("name", SWEPT)
def test_fuel_runs_out_exactly_everywhere(name: str) -> None:
    # Every budget up to many groups or calls: fuel runs out at each block of each
    # copy, a group is entered with exactly the fuel it needs or one less, and a call
    # with exactly the fuel of the callee's first block or one less.
    program = load(SWEPT[name].encode(), name="swept.s")
    for fuel in range(1, 400):
        both(program, None, [30], fuel=fuel)


# A pointer stepped by r9 each round, in a body of 5 + `pad` instructions, so that a
# group has `copies` rounds (`bpfexec.vm.jit.unroll.GROUP_INSTRUCTIONS`).
STEPPED = """
    r6 = 30
    r9 = {step} ll
    r0 = 0
loop:
    r2 = *(u8 *)(r1 + 0)
    r0 += r2
    r1 += r9
{pads}
    r6 -= 1
    if r6 != 0 goto loop
    exit
"""


@pytest.mark.parametrize(
    ("copies", "pad", "step"),
    [
        (2, 22, 3),  # off the end of the buffer (64 bytes) in round 22
        (3, 12, 3),
        (5, 6, 3),
        (8, 0, 7),  # in round 10
        (8, 0, -1 & MASK64),  # off its start in round 1
        (8, 0, 1 << 32),  # into the next region
        (3, 12, 1 << 63),  # steps whose multiples wrap around to 0 (or 1): the round
        (5, 6, 1 << 62),  # before the first group faults already
        (8, 0, (1 + 3 * (1 << 64)) // 7),
    ],
)
def test_strided_accesses_fault_where_the_interpreter_does(copies, pad, step) -> None:
    # A group checks its strided accesses once, for its first and last round: whatever
    # round walks off the buffer faults at the same pc, with the same fuel.
    text = STEPPED.format(step=step, pads="\n".join(["    r3 += 1"] * pad))
    program = load(text.encode(), name="stepped.s")
    (loop,) = inner_loops(program)[0].values()
    assert loop.copies == copies
    result = both(program, None, [bytes(BUFFER)], fuel=10_000)
    assert result["trap"]["kind"] == "MEMORY_FAULT"


OPCODES = sorted(
    {cls | op | src for cls in (isa.ALU, isa.ALU64) for op in [*ALU_OPS, isa.NEG, isa.END]
     for src in (isa.K, isa.X)}
    | {isa.JMP | op | src for op in CONDITIONS for src in (isa.K, isa.X)}
    | {cls | mode | size for cls in (isa.LDX, isa.ST, isa.STX) for mode in (isa.MEM, isa.MEMSX)
       for size in SIZES}
    | {isa.STX | isa.ATOMIC | isa.W, isa.STX | isa.ATOMIC | isa.DW, isa.OP_JA, isa.OP_JA32,
       isa.OP_CALL, isa.OP_CALLX, isa.OP_EXIT, isa.LDDW, 0xFF}
)  # fmt: skip
RAW = st.builds(
    Instruction,
    st.sampled_from(OPCODES),
    st.integers(0, 15),
    st.integers(0, 15),
    st.integers(-8, 8),
    st.one_of(st.integers(-(1 << 31), (1 << 31) - 1), st.sampled_from(sorted(isa.ATOMIC_OPS))),
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(RAW, min_size=1, max_size=12))
def test_random_bytecode_agrees(code):
    """Hostile input: whatever loads must run identically (or fail identically)."""
    try:
        program = load(isa.encode([*code, Instruction(isa.OP_EXIT)]), name="random.bin")
    except vm.LoadError:
        return
    both(program, None, [bytes(16)], fuel=500, helpers=helpers)


# -- real programs ------------------------------------------------------------------------


INDEXED = """
    r3 = r1
    r3 += r2
    r0 = *(u8 *)(r3 + 0)
    r4 = r1
    r4 += r2
    r5 = *(u64 *)(r4 - 3)
    r0 += r5
    *(u16 *)(r3 + 1) = r0
    r4 += r2
    r5 = *(u8 *)(r4 + 2)
    r0 += r5
    exit
"""


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize(
    "index",
    [0, 3, 12, 13, 14, 15, 16, -1, -3, 1 << 32, (1 << 32) + 5, -(1 << 32), 2**63 - 1, -(2**63)],
)
def test_pointer_plus_index_register_is_checked_exactly(index: int, tier: str) -> None:
    # A root pointer plus an index register, once and then twice: the fast check must
    # agree with the exact translation at both ends of the buffer, across regions (the
    # second buffer sits 1 << 32 above the first) and when the sum wraps.
    program = loaded(INDEXED.encode(), "indexed.s", tier)
    both(program, None, [bytes(range(16)), index & (2**64 - 1), bytes(range(100, 116))])


POKED = """
    r2 = 0x1122334455667788 ll
    *(u64 *)(r10 - 8) = r2
    r1 = r10
    r1 += -8
    r2 = 0x41
    call 4
    r0 = *(u64 *)(r10 - 8)
    exit
"""


@pytest.mark.parametrize("tier", TIERS)
def test_a_helper_writing_the_frame_replaces_a_stored_value(tier: str) -> None:
    # The JIT forwards a value stored at r10 - 8 to a later load from there, but not
    # across a helper call: `poke` writes the frame through its pointer argument.
    result = both(loaded(POKED.encode(), "poked.s", tier), None, [], helpers=helpers)
    assert result["r0"] == 0x41


WALK = """
    r0 = 0
loop:
    r4 = *(u64 *)(r1 + 8)
    r0 += r4
    r1 = *(u64 *)(r1 + 0)
    r3 += -1
    if r3 != 0 goto loop
    exit
"""


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize(
    "last",
    [
        buffer_base(1) + 64,  # the end of the second buffer: its region, out of bounds
        buffer_base(1) + 48,  # the last node, read again: a cycle
        buffer_base(0) + 2**31,
        0,  # region 0, never mapped
        buffer_base(7),  # a buffer number no run maps
        2**64 - 8,  # region 2^32 - 1
        STACK_BASE + 8,  # the stack: readable
        2**36 + 16,  # region 16: a table of 16 entries would map it to region 0
    ],
)
def test_a_list_walked_across_regions_faults_where_the_interpreter_does(last, tier):
    # Nodes {next, value} alternate between two buffers, node k at 16 * (k // 2) in
    # buffer k % 2; the optimized tier guesses that each pointer loaded from memory
    # is in the region the one before it was.
    buffers = [bytearray(64), bytearray(64)]
    for k in range(8):
        after = buffer_base((k + 1) % 2) + 16 * ((k + 1) // 2) if k < 7 else last
        buffers[k % 2][16 * (k // 2) : 16 * (k // 2) + 16] = struct.pack("<QQ", after, k + 1)
    program = loaded(WALK.encode(), "walk.s", tier)
    assert both(program, None, [*map(bytes, buffers), 8])["r0"] == 36
    for steps in (9, 12, 20):
        both(program, None, [*map(bytes, buffers), steps])


def loaded(code: bytes, name: str, tier: str) -> Program:
    """A fresh Program whose JIT runs will use `tier` (the quick one once compiled)."""
    program = load(code, name=name)
    if tier == "quick":
        compile_program(program, quick=True)
    return program


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("path", CASE_FILES, ids=[p.stem for p in CASE_FILES])
def test_instruction_cases_agree(path: Path, tier: str) -> None:
    case = parse_case(path.read_text(), path.name)
    program = loaded(case.asm.encode(), path.name, tier)
    for fuel in (BUDGET, 3):  # and once starved, to compare where fuel runs out
        both(program, None, case.arguments, fuel=fuel)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("source", C_FIXTURES, ids=[p.stem for p in C_FIXTURES])
def test_c_fixtures_agree(compile_c, source: Path, tier: str) -> None:
    resolver = HelperChain(seed_registry, AnyHelper())
    for debug in (False, True):
        program = loaded(compile_c(source.stem, debug=debug).read_bytes(), source.name, tier)
        for fn in program.functions:
            for args in ([], [7, 3, 2], [bytes(range(64)), 64], [0x0000000700000005]):
                for fuel in (100_000, 25):
                    both(program, fn.name, args, fuel=fuel, helpers=resolver)
