"""The legacy packet loads LD_ABS and LD_IND, with the kernel's semantics, on every engine.

`r0 = *(u16 *)skb[12]` (LD_ABS) and `r0 = *(u8 *)skb[r7 + 2]` (LD_IND) read the
packet of the context in r6: its start and end are the u64s at PACKET_DATA and
PACKET_END (`bpfexec.vm.program_types`). The tests build that context by hand: the
first argument buffer is the context, the second the packet. A load outside the
packet ends the program at once with r0 = 0 and no trap, from any call depth, and
the fuel used is that of the instructions run up to it.

Every test runs on the interpreter and on both tiers of the JIT (`engine` below)
and holds each to the same expected r0, fuel and trap: that is what makes them
indistinguishable.
"""

from __future__ import annotations

import struct

import pytest

from bpfexec import vm
from bpfexec.vm import isa
from bpfexec.vm.assembler import assemble
from bpfexec.vm.disassembler import disassemble, format_instruction
from bpfexec.vm.errors import TrapKind, VerifyError
from bpfexec.vm.isa import MASK64, Instruction
from bpfexec.vm.machine import available_engines, prepare
from bpfexec.vm.memory import buffer_base
from bpfexec.vm.program import Program
from bpfexec.vm.program_types import CONTEXT_SIZE, PACKET_DATA, PACKET_END

# The interpreter, the optimized JIT tier ("jit") and the quick one ("jit-quick").
JIT = ("jit", "jit-quick") if "jit" in available_engines() else ()
ENGINES = ["interpreter", *JIT]

PACKET = bytes((7 * k + 0x21) & 0xFF for k in range(48))  # every byte differs from its neighbours
CONTEXT = buffer_base(0)  # the first argument buffer
START = buffer_base(1)  # the second: the packet


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """This module's engines: the interpreter and each JIT tier."""
    return str(request.param)


def context(start: int = START, end: int | None = None, size: int = CONTEXT_SIZE) -> bytes:
    """A context buffer whose packet is [start, end) (default: all of PACKET)."""
    ctx = bytearray(max(size, PACKET_END + 8))
    end = start + len(PACKET) if end is None else end
    struct.pack_into("<QQ", ctx, PACKET_DATA, start & MASK64, end & MASK64)
    return bytes(ctx[:size])


def packet_args(length: int = len(PACKET), *more: int | bytes) -> list[int | bytes]:
    """r1 = a context whose packet is the first `length` bytes of r2 = PACKET."""
    return [context(START, START + length), PACKET, *more]


def loaded(source: str, engine: str) -> Program:
    """`source` assembled and loaded, with the tier `engine` names compiled natively."""
    program = vm.load(source.encode(), name="ld_abs.s")
    if engine.startswith("jit"):
        from bpfexec.vm.jit import compile_program

        assert compile_program(program, quick=engine == "jit-quick").native
    return program


def run(
    program: Program, engine: str, args: list[int | bytes], function: str | None = None, **kw
) -> vm.Result:
    """Run on `engine`; a JIT run must run natively, not on the interpreter."""
    name = "jit" if engine.startswith("jit") else "interpreter"
    if name == "jit":
        from bpfexec.vm.jit import best_compiled
        from bpfexec.vm.jit.runtime import runs_natively

        machine = prepare(program, function, args, **kw)
        compiled = best_compiled(program)
        assert compiled is not None and compiled.quick == (engine == "jit-quick")
        assert runs_natively(compiled, machine)
    return vm.execute(program, function, args, engine=name, **kw)


def check(result: vm.Result, r0: int, fuel: int) -> None:
    assert result.trap is None, result.trap
    assert (result.return_value, result.fuel_used) == (r0, fuel)


def big_endian(offset: int, size: int) -> int:
    return int.from_bytes(PACKET[offset : offset + size], "big")


SIZES = {1: "u8", 2: "u16", 4: "u32"}


# -- LD_ABS ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_ld_abs_reads_big_endian_up_to_the_end(engine: str, size: int) -> None:
    for offset in (0, 1, 13, len(PACKET) - size):
        program = loaded(f"r6 = r1\nr0 = *({SIZES[size]} *)skb[{offset}]\nexit\n", engine)
        check(run(program, engine, packet_args()), big_endian(offset, size), 3)


@pytest.mark.parametrize("size", SIZES)
def test_one_byte_past_the_end_ends_the_program(engine: str, size: int) -> None:
    source = f"""
        r6 = r1
        r0 = *({SIZES[size]} *)skb[{{offset}}]
        r0 += 100
        r1 = 5
        exit
    """
    last = len(PACKET) - size
    inside = loaded(source.format(offset=last), engine)
    check(run(inside, engine, packet_args()), big_endian(last, size) + 100, 5)
    past = loaded(source.format(offset=last + 1), engine)
    check(run(past, engine, packet_args()), 0, 2)  # the rest never runs, nor costs
    # A shorter packet: the same load is now past its end.
    check(run(inside, engine, packet_args(len(PACKET) - 1)), 0, 2)


@pytest.mark.parametrize(
    "offset",
    [-1, -4, -0x1000, -0x100000, -0x200000, -(1 << 31)],
    ids=["-1", "-4", "SKF_AD_OFF", "SKF_NET_OFF", "SKF_LL_OFF", "min"],
)
def test_negative_offsets_are_outside_the_packet(engine: str, offset: int) -> None:
    """The kernel's ancillary loads (SKF_AD_*, SKF_NET_OFF, SKF_LL_OFF) are not
    supported: every negative offset ends the program."""
    program = loaded(f"r6 = r1\nr0 = *(u8 *)skb[{offset}]\nr0 = 7\nexit\n", engine)
    check(run(program, engine, packet_args()), 0, 2)


def test_an_empty_or_backwards_packet_has_no_bytes(engine: str) -> None:
    program = loaded("r6 = r1\nr0 = *(u8 *)skb[0]\nexit\n", engine)
    for start, end in ((START, START), (START + 10, START + 5), (START, 0)):
        check(run(program, engine, [context(start, end), PACKET]), 0, 2)


def test_the_end_is_compared_without_wrapping(engine: str) -> None:
    """start + off + size > end as integers: near 2^64 it does not wrap around."""
    top = MASK64 - 1
    byte = loaded("r6 = r1\nr0 = *(u8 *)skb[0]\nexit\n", engine)
    half = loaded("r6 = r1\nr0 = *(u16 *)skb[0]\nexit\n", engine)
    # The last byte below 2^64 is inside [top, 2^64 - 1): it is read, and faults.
    fault = run(byte, engine, [context(top, MASK64), PACKET]).trap
    assert fault is not None and fault.kind == TrapKind.MEMORY_FAULT and fault.pc == 1
    assert fault.message == f"read of 1 bytes at {top:#x} (unmapped address)"
    # Two bytes reach 2^64, past the end: the program ends (a wrapped sum would fault).
    check(run(half, engine, [context(top, MASK64), PACKET]), 0, 2)


# -- LD_IND ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "imm", "offset"),
    [
        (0, 0, 0),
        (5, 3, 8),
        (len(PACKET) - 2, 0, len(PACKET) - 2),
        (len(PACKET) - 1, 0, None),  # one byte past the end
        (-4 & MASK64, 6, 2),  # a negative index plus imm
        (3, -5, None),  # ... and a negative sum
        ((1 << 32) + 3, 0, 3),  # only the low 32 bits of the register count
        ((1 << 63) | 1, 2, 3),
        (MASK64, 1, 0),  # (s32)(-1 + 1) = 0
        (0x7FFF_FFFF, 1, None),  # the 32-bit sum wraps to -2^31
        (0x8000_0000, 0, None),  # negative as an int
        (0xFFFF_FFFF, 0, None),  # -1
        (0x7FFF_FFFF, 0, None),  # far past the end
        (0, -(1 << 31), None),
    ],
)
def test_ld_ind_adds_the_register_and_imm_as_32_bit_ints(
    engine: str, index: int, imm: int, offset: int | None
) -> None:
    sign = "-" if imm < 0 else "+"
    source = f"""
        r6 = r1
        r7 = {index} ll
        r0 = *(u16 *)skb[r7 {sign} {abs(imm)}]
        exit
    """
    program = loaded(source, engine)
    result = run(program, engine, packet_args())
    if offset is None:
        check(result, 0, 3)
    else:
        check(result, big_endian(offset, 2), 4)


def test_r1_to_r5_keep_their_values(engine: str) -> None:
    """The kernel makes r1..r5 unreadable after a packet load; here they are unchanged."""
    source = """
        r6 = r1
        r1 = 1
        r2 = 2
        r3 = 3
        r4 = 4
        r5 = 5
        call load
        r0 *= 100000
        r2 *= 10
        r3 *= 100
        r4 *= 1000
        r5 *= 10000
        r0 += r1
        r0 += r2
        r0 += r3
        r0 += r4
        r0 += r5
        exit
    load:
        r0 = *(u8 *)skb[r4 + 1]
        exit
    """
    program = loaded(source, engine)
    check(run(program, engine, packet_args()), PACKET[5] * 100000 + 54321, 20)


# -- ending the program -----------------------------------------------------------------------

CALLS = """
    r6 = r1
    r2 = {index}
    call outer
    r0 += 1000
    exit
outer:
    call inner
    r0 += 100
    exit
inner:
    r0 = *(u16 *)skb[r2]
    r0 += 10
    exit
"""


def test_the_program_ends_from_inside_a_local_call(engine: str) -> None:
    inside = loaded(CALLS.format(index=4), engine)
    check(run(inside, engine, packet_args()), big_endian(4, 2) + 1110, 11)
    past = loaded(CALLS.format(index=len(PACKET) - 1), engine)
    check(run(past, engine, packet_args()), 0, 5)  # nothing after the load, in any frame


RECURSION = """
    r6 = r1
    call rec
    exit
rec:
    if r3 == 0 goto load
    r3 -= 1
    call rec
    r0 += 1
    exit
load:
    r0 = *(u8 *)skb[{offset}]
    exit
"""


@pytest.mark.parametrize("depth", [0, 1, 5, 62])
def test_the_program_ends_from_any_call_depth(engine: str, depth: int) -> None:
    inside = loaded(RECURSION.format(offset=len(PACKET) - 1), engine)
    result = run(inside, engine, packet_args(len(PACKET), depth))
    check(result, PACKET[-1] + depth, 2 + 3 * depth + 3 + 2 * depth + 1)
    past = loaded(RECURSION.format(offset=len(PACKET)), engine)
    check(run(past, engine, packet_args(len(PACKET), depth)), 0, 2 + 3 * depth + 2)
    # The frames it left behind do not count against a run that follows.
    again = run(inside, engine, packet_args(len(PACKET), depth))
    check(again, PACKET[-1] + depth, result.fuel_used)


def test_a_packet_load_ends_its_block_for_fuel(engine: str) -> None:
    """The load ends a basic block: the fuel charged is that of the instructions up to
    it, and a budget that covers them but not the rest runs out after it."""
    source = """
        r6 = r1
        r0 = *(u8 *)skb[{offset}]
        r0 += 1
        r0 += 1
        exit
    """
    past = loaded(source.format(offset=len(PACKET)), engine)
    check(run(past, engine, packet_args(), fuel=2), 0, 2)
    starved = run(past, engine, packet_args(), fuel=1).trap
    assert starved is not None and (starved.kind, starved.pc) == (TrapKind.OUT_OF_FUEL, 0)
    inside = loaded(source.format(offset=0), engine)
    check(run(inside, engine, packet_args(), fuel=5), PACKET[0] + 2, 5)
    short = run(inside, engine, packet_args(), fuel=4)
    assert short.trap is not None and (short.trap.kind, short.trap.pc) == (TrapKind.OUT_OF_FUEL, 2)
    assert short.fuel_used == 2


# -- loops: the optimized tier unrolls them -------------------------------------------------------

SUM = """
    r6 = r1
    r8 = 0
    r9 = 0
loop:
    r0 = *(u8 *)skb[r9 + 0]
    r8 += r0
    r9 += {step}
    if r9 != {stop} goto loop
    r0 = r8
    exit
"""


@pytest.mark.parametrize(("step", "stop"), [(1, 40), (1, 47), (3, 45), (1, 50), (5, 60)])
def test_a_packet_load_in_a_loop(engine: str, step: int, stop: int) -> None:
    from support import inner_loops

    program = loaded(SUM.format(step=step, stop=stop), engine)
    assert inner_loops(program)[0], "the optimized tier unrolls this loop"
    result = run(program, engine, packet_args())
    if stop <= len(PACKET):
        total = sum(PACKET[k] for k in range(0, stop, step))
        check(result, total, 3 + 4 * len(range(0, stop, step)) + 2)
    else:  # the round at the first index past the end ends the program
        rounds = len(range(0, len(PACKET), step))
        check(result, 0, 3 + 4 * rounds + 1)


LOOKUP = """
    r6 = r1
    r8 = 0
    r9 = 0
loop:
    r0 = *(u8 *)skb[r9]
    r2 = r3
    r2 += r0
    r4 = *(u8 *)(r2 + 0)
    r8 += r4
    r9 += 1
    if r9 != 16 goto loop
    r0 = r8
    exit
"""


def test_a_loop_does_not_take_r0_for_unchanged_across_a_packet_load(engine: str) -> None:
    """In an unrolled loop, an access through the byte a packet load wrote is checked
    in every round: the load writes r0, so r0 is no loop invariant (`induction`)."""
    from support import inner_loops

    program = loaded(LOOKUP, engine)
    assert inner_loops(program)[0]
    table = bytes(range(100, 164))
    small = bytes(k % 64 for k in range(16)) + PACKET[16:]
    ok = run(program, engine, [context(), small, table])
    check(ok, sum(table[k % 64] for k in range(16)), 3 + 7 * 16 + 2)
    large = bytes(k % 64 for k in range(9)) + bytes([200]) + PACKET[10:]  # round 9 faults
    fault = run(program, engine, [context(), large, table]).trap
    assert fault is not None and (fault.kind, fault.pc) == (TrapKind.MEMORY_FAULT, 6)
    assert (
        fault.message
        == f"read of 1 bytes at {buffer_base(2) + 200:#x} (buffer 2 region of 64 bytes)"
    )


# -- memory faults --------------------------------------------------------------------------------


def test_reading_the_context_faults_as_a_load_does(engine: str) -> None:
    """No context in r6: the read of the packet's start is a u64 load at r6 + 256."""
    plain = loaded(f"r6 = 16\nr0 = *(u64 *)(r6 + {PACKET_DATA})\nexit\n", "interpreter")
    expected = run(plain, "interpreter", []).trap
    program = loaded("r6 = 16\nr0 = *(u8 *)skb[0]\nexit\n", engine)
    trap = run(program, engine, []).trap
    assert expected is not None and trap is not None
    assert (trap.kind, trap.pc, trap.message) == (expected.kind, 1, expected.message)
    assert trap.instruction == "r0 = *(u8 *)skb[0]"
    # A context too short for the end word: its read faults.
    short_ctx = loaded("r6 = r1\nr0 = *(u8 *)skb[0]\nexit\n", engine)
    trap = run(short_ctx, engine, [context(size=PACKET_END + 4), PACKET]).trap
    assert trap is not None and (trap.kind, trap.pc) == (TrapKind.MEMORY_FAULT, 1)
    assert trap.message == (
        f"read of 8 bytes at {CONTEXT + PACKET_END:#x} (buffer 0 region of {PACKET_END + 4} bytes)"
    )


def test_reading_the_packet_faults_as_a_load_does(engine: str) -> None:
    """A packet that the context places in memory that is not there."""
    nowhere = 0x50 << 32
    program = loaded("r6 = r1\nr7 = 6\nr0 = *(u32 *)skb[r7 + 3]\nexit\n", engine)
    result = run(program, engine, [context(nowhere, nowhere + 100), PACKET])
    assert result.trap is not None and (result.trap.kind, result.trap.pc) == (
        TrapKind.MEMORY_FAULT,
        2,
    )
    assert result.trap.message == f"read of 4 bytes at {nowhere + 9:#x} (unmapped address)"
    assert result.fuel_used == 3
    # Past the end of the buffer that holds it, but inside the packet the context says.
    result = run(program, engine, [context(START + 40, START + 100), PACKET])
    assert result.trap is not None and result.trap.kind == TrapKind.MEMORY_FAULT
    assert (
        result.trap.message == f"read of 4 bytes at {START + 49:#x} (buffer 1 region of 48 bytes)"
    )


# -- a socket filter compiled by clang ------------------------------------------------------------


def ipv4(protocol: int, ihl: int = 5, ports: tuple[int, int] = (1234, 80)) -> bytes:
    ethernet = bytes(12) + b"\x08\x00"
    header = bytes([0x40 | ihl, 0, 0, 40, 0, 0, 0, 0, 64, protocol, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
    return ethernet + header + bytes(4 * ihl - 20) + struct.pack(">HH", *ports) + bytes(16)


@pytest.fixture(scope="module")
def filter_object(libbpf_objects, fixtures_dir) -> bytes:
    """tests/fixtures/ld_abs/filter.o: compiled now when clang is there, else committed."""
    return (libbpf_objects(fixtures_dir / "ld_abs") / "filter.o").read_bytes()


def test_clang_emits_ld_abs_and_ld_ind(filter_object: bytes) -> None:
    program = vm.load(filter_object, name="filter.o")
    modes = {insn.mode for insn in program.instructions if isa.is_packet_load(insn)}
    assert modes == {isa.ABS, isa.IND}
    sub = program.function("dest_port")
    assert not sub.exported
    assert any(isa.is_packet_load(i) for i in program.instructions[sub.pc : sub.pc + sub.size])


@pytest.mark.parametrize(
    ("packet", "length", "r0"),
    [
        (ipv4(6), None, 81),
        (ipv4(17, ports=(53, 5353)), None, 5354),
        (ipv4(1), None, 0),  # neither TCP nor UDP
        (ipv4(6, ihl=7), None, 81),  # IP options: the port is further on
        (ipv4(6), 38, 81),  # the port's last byte is the packet's last
        (ipv4(6), 37, 0),  # one byte short: dest_port's load ends the program
        (ipv4(6, ihl=15), 60, 0),  # the header says 60 bytes, the packet has fewer
        (ipv4(6), 13, 0),  # not even the EtherType
        (b"\x00" * 12 + b"\x86\xdd" + bytes(40), None, 0),  # IPv6
    ],
)
def test_a_clang_socket_filter(
    engine: str, filter_object: bytes, packet: bytes, length: int | None, r0: int
) -> None:
    program = vm.load(filter_object, name="filter.o")
    if engine.startswith("jit"):
        from bpfexec.vm.jit import compile_program

        assert compile_program(program, quick=engine == "jit-quick").native
    end = START + (len(packet) if length is None else length)
    args: list[int | bytes] = [context(START, end), packet]
    result = run(program, engine, args, "port_filter")
    assert result.trap is None and result.return_value == r0
    expected = vm.execute(program, "port_filter", args, engine="interpreter")
    assert result.fuel_used == expected.fuel_used
    source = run(program, engine, args, "source_address")
    word = int.from_bytes(packet[26:30], "big") if end - START >= 30 else 0
    assert (source.trap, source.return_value) == (None, word)


# -- loading, listing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("insn", "problem"),
    [
        (Instruction(isa.LD | isa.ABS | isa.DW, imm=4), "of 8 bytes does not exist"),
        (Instruction(isa.LD | isa.IND | isa.DW, src=1), "of 8 bytes does not exist"),
        (Instruction(isa.LD | isa.ABS | isa.W, src=1, imm=4), "reserved field src must be 0"),
        (Instruction(isa.LD | isa.ABS | isa.B, dst=2, imm=4), "reserved field dst must be 0"),
        (Instruction(isa.LD | isa.IND | isa.H, dst=1, src=1), "reserved field dst must be 0"),
        (Instruction(isa.LD | isa.IND | isa.H, src=1, offset=3), "reserved field offset must be 0"),
        (Instruction(isa.LD | isa.IND | isa.B, src=11), "invalid source register r11"),
    ],
)
def test_malformed_packet_loads_are_refused_at_load(insn: Instruction, problem: str) -> None:
    code = isa.encode(
        [Instruction(isa.ALU64 | isa.MOV | isa.X, 6, 1), insn, Instruction(isa.OP_EXIT)]
    )
    with pytest.raises(VerifyError) as caught:
        vm.load(code, name="bad.bin")
    assert caught.value.pc == 1
    assert problem in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("insn", "text"),
    [
        (Instruction(isa.LD | isa.ABS | isa.H, imm=12), "r0 = *(u16 *)skb[12]"),
        (Instruction(isa.LD | isa.ABS | isa.B, imm=-4096), "r0 = *(u8 *)skb[-4096]"),
        (Instruction(isa.LD | isa.IND | isa.W, src=7), "r0 = *(u32 *)skb[r7]"),
        (Instruction(isa.LD | isa.IND | isa.B, src=1, imm=14), "r0 = *(u8 *)skb[r1 + 14]"),
        (Instruction(isa.LD | isa.IND | isa.H, src=9, imm=-2), "r0 = *(u16 *)skb[r9 - 2]"),
        (
            Instruction(isa.LD | isa.IND | isa.B, src=1, imm=-(1 << 31)),
            "r0 = *(u8 *)skb[r1 - 2147483648]",
        ),
    ],
)
def test_packet_loads_print_and_assemble_back(insn: Instruction, text: str) -> None:
    assert format_instruction(insn) == text
    assert assemble(text).instructions == (insn,)


def test_an_llvm_objdump_listing_assembles(filter_object: bytes) -> None:
    """llvm-objdump's lines for the loads of filter.o, as it prints them."""
    listing = """
        0:	bf 16 00 00 00 00 00 00	r6 = r1
        1:	28 00 00 00 0c 00 00 00	r0 = *(u16 *)skb[12]
        2:	48 30 00 00 00 00 00 00	r0 = *(u16 *)skb[r3]
        3:	20 00 00 00 1a 00 00 00	r0 = *(u32 *)skb[26]
        4:	95 00 00 00 00 00 00 00	exit
    """
    code = assemble(listing).instructions
    assert isa.encode(list(code)).hex() == (
        "bf16000000000000" "280000000c000000" "4830000000000000" "200000001a000000"
        "9500000000000000"
    )  # fmt: skip
    program = vm.load(filter_object, name="filter.o")
    again = vm.load(disassemble(program).encode(), name="filter.s")
    assert again.instructions == program.instructions


def test_a_trace_shows_the_context_and_index_registers() -> None:
    program = loaded("r6 = r1\nr7 = 2\nr0 = *(u8 *)skb[r7 + 1]\nexit\n", "interpreter")
    lines: list[str] = []
    result = vm.execute(program, None, packet_args(), trace=lines.append)
    assert result.return_value == PACKET[3]
    assert lines[2].split(";")[1].split() == [f"r6={CONTEXT:#x}", "r7=0x2"]
