"""The stack reset between the packets of a native test run, attacked (`bpfexec.vm.jit.provenance`).

On the JIT, a test run's packets run in the native batch loop, which zeroes
between two packets only the part of the stack a run may have written
(`reset_extent`). With a packet context, stores through a map value, the
packet or the context are proven harmless; every other store through a
register that is not r10 makes the whole stack reset. Each attack here has one
packet (first byte 1) write deep in the stack through a pointer the proof must
not trust, and the next (first byte 0) read the slot back: on the JIT as on the
interpreter, the reader sees 0. The legitimate writers keep a small reset and
the same results.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

pytest.importorskip("llvmlite")

from bpfexec.vm.context_access import with_context
from bpfexec.vm.helpers import HelperChain
from bpfexec.vm.jit.batch_loop import reset_extent
from bpfexec.vm.jit.provenance import harmless_stores
from bpfexec.vm.limits import Limits
from bpfexec.vm.linux_helpers import linux_helpers
from bpfexec.vm.loader import load
from bpfexec.vm.machine import prepare
from bpfexec.vm.memory import Region, region_base
from bpfexec.vm.packet_helpers import packet_helpers
from bpfexec.vm.packet_run import run_packets
from bpfexec.vm.program import Program
from bpfexec.vm.program_types import ProgramType

OBJECTS = Path(__file__).parent / "fixtures" / "packets"
STACK, FRAME = Limits().stack_size, Limits().stack_frame_size
DEEP = region_base(Region.STACK) + STACK - 3000  # the slot r10 - 3000 of the entry's frame
MAC = bytes(12) + b"\x08\x00"


def packet(first: int) -> bytes:
    """A packet whose first byte says write (1) or read (0), bytes 8..15 the deep slot's
    address (little-endian), a minimal Ethernet header's worth of the rest."""
    return bytes([first]) + bytes(7) + DEEP.to_bytes(8, "little") + bytes(50)


def asm_program(text: str, section: str = "xdp") -> Program:
    loaded = load(text.encode())
    functions = tuple(dataclasses.replace(fn, section=section) for fn in loaded.functions)
    return dataclasses.replace(loaded, functions=functions)


def extent(program: Program, function: str, kind: ProgramType) -> int:
    rewritten = with_context(program, function)
    linux = HelperChain(packet_helpers(kind), linux_helpers())
    template = prepare(rewritten, function, (), linux=linux)
    return reset_extent(rewritten, template.entry, template.helpers, STACK, FRAME, True)[0]


def same_on_both(program: Program, function: str) -> list[int]:
    packets = [packet(1), packet(0), packet(1), packet(0)]
    alone = [r.retval for r in run_packets(program, function, packets)]
    native = [r.retval for r in run_packets(program, function, packets, engine="jit")]
    assert native == alone
    return native


def writer(body: str) -> str:
    """A program whose writer packet (first byte 1) runs `body`, which stores 0x41
    through r4 (r2 holds `data`, r3 the first byte), and whose reader packet reads
    the deep slot back through r10."""
    return f"""
entry:
    r2 = *(u32 *)(r1 + 0)
    r3 = *(u8 *)(r2 + 0)
    if r3 == 0 goto read
{body}
    *(u64 *)(r4 + 0) = 0x41
    r0 = 2
    exit
read:
    r0 = *(u64 *)(r10 - 3000)
    exit
"""


# The address comes from the packet's bytes (a load: no provenance).
LOADED = writer("    r4 = *(u64 *)(r2 + 8)")
# The address is a constant.
FORGED = writer(f"    r4 = {DEEP:#x} ll")
# The packet pointer plus a variable: anywhere, the stack included.
PACKET_PLUS_VARIABLE = writer(f"    r4 = {DEEP:#x} ll\n    r4 -= r2\n    r4 += r2")
# Two paths disagree on what r4 holds: the packet, or a forged address.
JOINED = writer(f"    r4 = r2\n    if r3 != 1 goto store\n    r4 = {DEEP:#x} ll\nstore:")
# A forged address moved through registers, over a value loaded from the packet.
MOVED = writer(f"    r4 = {DEEP:#x} ll\n    r5 = *(u64 *)(r2 + 8)\n    r5 = r4\n    r4 = r5")


@pytest.mark.parametrize(
    "source",
    [LOADED, FORGED, PACKET_PLUS_VARIABLE, JOINED, MOVED],
    ids=["loaded", "forged", "packet-plus-variable", "joined", "moved"],
)
def test_a_store_the_proof_cannot_place_resets_the_whole_stack(source: str) -> None:
    program = asm_program(source)
    assert extent(program, "entry", ProgramType.XDP) == STACK
    assert same_on_both(program, "entry") == [2, 0, 2, 0]


def test_a_store_into_the_contexts_pointers_is_not_trusted() -> None:
    # A tc program may write skb->cb (offset 48) through the context; a store at the
    # hidden `data` slot (256) is never trusted, whatever refuses it first.
    code = load(b"*(u64 *)(r1 + 256) = 0\nexit\n").instructions
    assert harmless_stores(code, 0, len(code), frozenset(), context=True) == frozenset()
    code = load(b"*(u32 *)(r1 + 48) = 0\nexit\n").instructions
    assert harmless_stores(code, 0, len(code), frozenset(), context=True) == {0}
    assert harmless_stores(code, 0, len(code), frozenset(), context=False) == frozenset()


def test_a_packet_writer_at_constant_offsets_keeps_a_small_reset() -> None:
    # Swap the MAC addresses' first bytes through the packet pointer (constant offsets),
    # keep a scratch word in the frame: the reset is that word's 8 bytes.
    source = """
    entry:
        r2 = *(u32 *)(r1 + 0)
        r3 = *(u32 *)(r1 + 4)
        r4 = r2
        r4 += 14
        if r4 > r3 goto out
        r5 = *(u8 *)(r2 + 0)
        r6 = *(u8 *)(r2 + 6)
        *(u8 *)(r2 + 0) = r6
        *(u8 *)(r2 + 6) = r5
        *(u64 *)(r10 - 8) = r5
    out:
        r0 = 3
        exit
    """
    program = asm_program(source)
    assert extent(program, "entry", ProgramType.XDP) == 8
    frame = bytes(range(1, 13)) + b"\x08\x00" + bytes(46)
    alone = [r.data for r in run_packets(program, "entry", [frame, frame])]
    native = [r.data for r in run_packets(program, "entry", [frame, frame], engine="jit")]
    assert native == alone and alone[0][0] == 7 and alone[0][6] == 1


def test_a_map_counter_keeps_a_small_reset() -> None:
    program = load((OBJECTS / "xdp_count.o").read_bytes(), "xdp_count.o")
    assert extent(program, "xdp_count", ProgramType.XDP) == 4  # the lookup's key
