"""Attacks on the checks the JIT elides: each program aims at one optimization's
assumption (docs/jit.md, "Where a check is elided, and why that is sound") and
must run exactly as on the interpreter on both tiers: same r0, fuel, trap (kind,
pc, message) and buffers. A wrong elision here is a native access outside the
VM's memory, which ends the test process with a crash rather than a mismatch.
"""

from __future__ import annotations

import pytest

pytest.importorskip("llvmlite")

from test_differential import TIERS, helpers, loaded
from test_differential import both as run_both

from bpfexec.vm.isa import MASK64
from bpfexec.vm.jit.compiler import STEP_BOUND
from bpfexec.vm.limits import Limits
from bpfexec.vm.memory import buffer_base


def both(*args, **kw) -> dict[str, object]:
    """The common outcome of the interpreter and the JIT, which must be a run."""
    outcome = run_both(*args, **kw)
    assert "raised" not in outcome, outcome
    return outcome


INVERSE_7 = pow(7, -1, 1 << 64)
INVERSE_3 = pow(3, -1, 1 << 64)

# Steps whose multiples wrap: 7 * step is 8, 16, 1 or -8 (a group of 8 rounds checks
# rounds 0 and 7), 3 * step is 8; steps at the bound and past it; ordinary ones.
STEPS = [
    8 * INVERSE_7 & MASK64,
    16 * INVERSE_7 & MASK64,
    INVERSE_7,
    -8 * INVERSE_7 & MASK64,
    8 * INVERSE_3 & MASK64,
    STEP_BOUND - 1,
    STEP_BOUND,
    -STEP_BOUND & MASK64,
    -(STEP_BOUND - 1) & MASK64,
    1 << 63,
    (1 << 63) + 8,
    1,
    4,
    -1 & MASK64,
    0,
]

# A rotated loop (clang's shape): the inner loop's head is entered by backward jumps
# from the outer latch, which is outside the inner loop's body. No round of the inner
# loop has run with the registers the outer latch hands it (r1 reset, r2 the step).
OUTER_LATCH = """
    r0 = 0
    r6 = r2
    r2 = 1
    r3 = 0
    r9 = r1
    r7 = 0
    goto outer
loop:
    {access}
    r1 += r2
    r3 += 1
    if r3 < 16 goto loop
    r7 += 1
outer:
    if r7 > 1 goto done
    r1 = r9
    r3 = 0
    if r7 == 0 goto loop
    r2 = r6
    goto loop
done:
    exit
"""
ACCESSES = {
    "load": "r4 = *(u8 *)(r1 + 0)\n    r0 += r4",
    "store": "*(u8 *)(r1 + 0) = r3",
    "wide-load": "r4 = *(u64 *)(r1 + 0)\n    r0 += r4",
    "atomic": "lock *(u32 *)(r1 + 0) += r3",
}


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("access", ACCESSES)
@pytest.mark.parametrize("step", STEPS, ids=[f"{s:#x}" for s in STEPS])
def test_a_group_entered_from_outside_its_loop_checks_its_step(step, access, tier):
    program = loaded(OUTER_LATCH.format(access=ACCESSES[access]).encode(), "outer.s", tier)
    both(program, None, [bytes(range(64)), step])


# The same loop entered only through its own latch, the step from a register: the
# round before each group made the access, and a wrapping step faults there.
LATCH_ONLY = """
    r0 = 0
    r3 = 0
loop:
    r4 = *(u8 *)(r1 + 0)
    r0 += r4
    *(u8 *)(r1 + 1) = r3
    r1 += r2
    r3 += 1
    if r3 < 40 goto loop
    exit
"""


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("step", STEPS, ids=[f"{s:#x}" for s in STEPS])
def test_a_register_step_walks_off_its_buffer_where_the_interpreter_does(step, tier):
    program = loaded(LATCH_ONLY.encode(), "latch.s", tier)
    for size in (64, 48, 13, 2):
        both(program, None, [bytes(range(size)), step])


# A frame array walked by a register step from an outer latch: r10 plus an index is
# not a constant frame offset, so it is a strided access like any other.
FRAME_WALK = """
    r0 = 0
    r6 = r1
    r2 = 1
    r3 = 0
    r7 = 0
    goto outer
loop:
    *(u8 *)(r1 + 0) = r3
    r4 = *(u8 *)(r1 + 0)
    r0 += r4
    r1 += r2
    r3 += 1
    if r3 < 16 goto loop
    r7 += 1
outer:
    if r7 > 1 goto done
    r1 = r10
    r1 += -64
    r3 = 0
    if r7 == 0 goto loop
    r2 = r6
    goto loop
done:
    exit
"""


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("step", STEPS, ids=[f"{s:#x}" for s in STEPS])
def test_a_frame_array_walked_by_a_wrapping_step_faults(step, tier):
    both(loaded(FRAME_WALK.encode(), "frame-walk.s", tier), None, [step])


# Two pointers into one buffer with different steps, one written through and the
# other read: both strided, both checked once per group, and aliasing each other.
ALIASED = """
    r0 = 0
    r5 = r1
    r5 += r3
    r6 = 0
loop:
    r4 = *(u8 *)(r1 + 0)
    r4 += 1
    *(u8 *)(r5 + 0) = r4
    r7 = *(u8 *)(r5 + 0)
    r0 += r7
    r1 += r2
    r5 += r4
    r5 -= r4
    r5 += 1
    r6 += 1
    if r6 < 30 goto loop
    exit
"""


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("step", [1, 2, -1 & MASK64, 8 * INVERSE_7 & MASK64])
@pytest.mark.parametrize("offset", [0, 1, 7, 33, -1 & MASK64])
def test_aliased_strided_pointers_agree(step, offset, tier):
    program = loaded(ALIASED.encode(), "aliased.s", tier)
    both(program, None, [bytes(range(64)), step, offset])


# A local call between the group's check and its accesses would be a poll site and a
# possible writer of the caller's frame: such a body is never unrolled, but the loop
# around it still is entered from an outer latch. The callee moves the pointer.
CALL_IN_LOOP = """
    r0 = 0
    r6 = r1
    r7 = 0
loop:
    r4 = *(u8 *)(r6 + 0)
    r0 += r4
    r1 = r6
    r2 = r3
    call advance
    r6 = r0
    r0 = r4
    r7 += 1
    if r7 < 20 goto loop
    exit
advance:
    r0 = r1
    r0 += r2
    exit
"""


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("step", [1, 8 * INVERSE_7 & MASK64, STEP_BOUND])
def test_a_call_in_the_loop_keeps_every_access_checked(step, tier):
    both(loaded(CALL_IN_LOOP.encode(), "call.s", tier), None, [bytes(range(64)), 64, step])


# A parameter no instruction writes has its translation hoisted into the prologue.
# Here r1 is rewritten only by an atomic fetch, r3 only by a load: neither may be
# hoisted, and the loads after them go through the new pointers.
PARAMETER_WRITES = """
    r0 = 0
    r6 = 0
loop:
    r4 = *(u8 *)(r1 + 0)
    r0 += r4
    r5 = *(u8 *)(r3 + 0)
    r0 += r5
    r1 = atomic_fetch_add((u64 *)(r2 + 0), r1)
    r3 = *(u64 *)(r2 + 8)
    r6 += 1
    if r6 < 3 goto loop
    exit
"""


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("target", [buffer_base(0) + 60, buffer_base(0) + 64, 1 << 40, 0])
def test_a_parameter_written_by_an_atomic_or_a_load_is_not_hoisted(target, tier):
    table = target.to_bytes(8, "little") + (buffer_base(2) + 3).to_bytes(8, "little")
    program = loaded(PARAMETER_WRITES.encode(), "params.s", tier)
    both(program, None, [bytes(range(64)), bytes(table), bytes(range(8))])


# A spilled pointer is forwarded from its frame slot with its root. A store through a
# pointer that went through memory (no known root) may overwrite the slot: the reload
# after it must read memory, and the access through it must use the new pointer.
SPILL_OVERWRITTEN = """
    *(u64 *)(r10 - 16) = r1
    r4 = r10
    r4 += -16
    *(u64 *)(r2 + 0) = r4
    r5 = *(u64 *)(r2 + 0)
    if r3 == 0 goto keep
    *(u64 *)(r5 + 0) = r3
keep:
    r6 = *(u64 *)(r10 - 16)
    r0 = *(u8 *)(r6 + 0)
    exit
"""


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("pointer", [0, buffer_base(1) + 1, buffer_base(0) + 64, 1 << 63])
def test_a_spilled_pointer_overwritten_through_an_alias_is_reloaded(pointer, tier):
    program = loaded(SPILL_OVERWRITTEN.encode(), "spill.s", tier)
    both(program, None, [bytes(range(64)), bytes(8), pointer])


# A helper writes the frame slot a spilled pointer sits in (helper 4, `poke`, stores
# r2 at r1): the reload must see the helper's value, not the spilled pointer.
SPILL_POKED = """
    *(u64 *)(r10 - 8) = r1
    r1 = r10
    r1 += -8
    call 4
    r6 = *(u64 *)(r10 - 8)
    r0 = *(u8 *)(r6 + 0)
    exit
"""


@pytest.mark.parametrize("tier", TIERS)
def test_a_spilled_pointer_poked_by_a_helper_is_reloaded(tier):
    program = loaded(SPILL_POKED.encode(), "poked.s", tier)
    both(program, None, [bytes(range(64)), 0x41], helpers=helpers)


# Region guesses: a pointer loaded from memory is guessed to be in the region the
# previous translation found. Alternate the regions, and point into an unmapped one
# whose number a 16-entry table would clamp to region 0.
GUESSES = """
    r0 = 0
    r6 = 0
loop:
    r3 = *(u64 *)(r2 + 0)
    r4 = *(u8 *)(r3 + 0)
    r0 += r4
    r2 += 8
    r6 += 1
    if r6 < 4 goto loop
    exit
"""


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize(
    "pointers",
    [
        [buffer_base(0), buffer_base(2) + 3, buffer_base(0) + 63, buffer_base(2)],
        [buffer_base(0), 16 << 32, 0, buffer_base(0)],
        [buffer_base(2) + 7, buffer_base(2) + 8, buffer_base(0) + 64, 0],
        [buffer_base(0), (1 << 64) - 1, buffer_base(0), buffer_base(0)],
    ],
)
def test_region_guesses_fault_where_the_interpreter_does(pointers, tier):
    table = b"".join(p.to_bytes(8, "little") for p in pointers)
    program = loaded(GUESSES.encode(), "guesses.s", tier)
    both(program, None, [bytes(range(64)), table, bytes(range(8))])


# Unchecked frame accesses: every frame of every depth must lie in the stack region.
# Recursion to the deepest frame allowed touches both ends of each frame.
DEEP_FRAMES = """
    r0 = 0
    call down
    exit
down:
    *(u8 *)(r10 - 512) = r1
    *(u64 *)(r10 - 8) = r1
    r1 -= 1
    if r1 == 0 goto bottom
    call down
bottom:
    r2 = *(u8 *)(r10 - 512)
    r3 = *(u64 *)(r10 - 8)
    r0 += r2
    r0 += r3
    exit
"""


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("depth", [1, 7, 8, 9, 64])
def test_frames_at_every_depth_stay_in_the_stack(depth, tier):
    program = loaded(DEEP_FRAMES.encode(), "deep.s", tier)
    both(program, None, [depth], limits=Limits(max_call_depth=8))
