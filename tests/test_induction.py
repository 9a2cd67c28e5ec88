"""Which accesses of an unrolled loop move by a fixed step per round
(`bpfexec.vm.jit.induction`): the analysis alone.

That groups which check these accesses once behave exactly like the interpreter is
tested in `test_differential.py` (random loops, strided accesses that fault)."""

from __future__ import annotations

from support import inner_loops

from bpfexec.vm.isa import MASK64
from bpfexec.vm.jit.induction import Linear, Stride, strided_accesses
from bpfexec.vm.loader import load


def strides(text: str) -> dict[int, Stride]:
    """The strided accesses of the one unrolled loop in `text`."""
    program = load(text.encode(), name="strides.s")
    loops, blocks, jumps = inner_loops(program)
    (loop,) = loops.values()
    return strided_accesses(loop, blocks, program.instructions, jumps)


def form(constant: int = 0, **terms: int) -> Linear:
    """`form(8, r1=1, r2=4)`: 8 + r1 + 4*r2."""
    pairs = sorted((int(name[1:]), coefficient & MASK64) for name, coefficient in terms.items())
    return Linear(constant & MASK64, tuple(pairs))


def test_a_buffer_indexed_by_a_counter() -> None:
    # byte_sum: r3 = r1 + r2 each round, r2 counts up by one.
    found = strides("""
        r0 = 0
    loop:
        r3 = r1
        r3 += r2
        r4 = *(u8 *)(r3 + 5)
        r0 += r4
        r2 += 1
        if r2 < 100 goto loop
        exit
    """)
    assert found == {3: Stride(form(5, r1=1, r2=1), form(1))}


def test_a_pointer_stepped_by_an_invariant_register() -> None:
    # sieve's inner loop: the pointer moves by r3, which the loop never writes.
    found = strides("""
    loop:
        *(u8 *)(r8 + 0) = r6
        r7 += r3
        r8 += r3
        if r2 > r7 goto loop
        exit
    """)
    assert found == {0: Stride(form(r8=1), form(r3=1))}


def test_scaled_and_negative_steps() -> None:
    # r5 = r1 + 8 * r6 - 16, and r6 counts down: the address moves by -8.
    found = strides("""
    loop:
        r5 = r6
        r5 <<= 3
        r5 += r1
        r5 -= 16
        r0 = *(u64 *)(r5 + 0)
        r6 -= 1
        if r6 != 0 goto loop
        exit
    """)
    assert found == {4: Stride(form(-16, r1=1, r6=8), form(-8))}


def test_two_accesses_with_different_steps() -> None:
    # matmul's inner loop: one pointer moves by an invariant row length, one by 4.
    found = strides("""
    loop:
        r3 = *(u32 *)(r6 + 0)
        r6 += r4
        r1 = *(u32 *)(r9 + 0)
        r3 *= r1
        r9 += 4
        r8 += 1
        if r2 > r8 goto loop
        exit
    """)
    assert found == {0: Stride(form(r6=1), form(r4=1)), 2: Stride(form(r9=1), form(4))}


def test_addresses_that_are_not_linear_are_left_alone() -> None:
    # Loaded, squared, 32-bit or sign-extended values: no fixed step.
    found = strides("""
    loop:
        r3 = *(u64 *)(r1 + 0)
        r4 = *(u8 *)(r3 + 0)
        r5 = r2
        r5 *= r2
        r4 = *(u8 *)(r5 + 0)
        w6 = w2
        r4 = *(u8 *)(r6 + 0)
        r7 = (s32)r2
        r4 = *(u8 *)(r7 + 0)
        r2 += 1
        if r2 < 100 goto loop
        exit
    """)
    assert found == {0: Stride(form(r1=1), form(0))}


def test_a_step_that_depends_on_the_round_is_not_fixed() -> None:
    # r1 moves by r2, and r2 itself changes each round.
    found = strides("""
    loop:
        r0 = *(u8 *)(r1 + 0)
        r1 += r2
        r2 += 1
        if r2 < 100 goto loop
        exit
    """)
    assert found == {}


def test_only_accesses_every_round_makes() -> None:
    # The store is skipped on odd rounds; the load is made every round, and the
    # pointer is stepped on both paths alike.
    found = strides("""
    loop:
        r3 = *(u8 *)(r1 + 0)
        if r3 & 1 goto odd
        *(u8 *)(r1 + 1) = r3
        r1 += 2
        goto next
    odd:
        r1 += 2
    next:
        r2 -= 1
        if r2 != 0 goto loop
        exit
    """)
    assert found == {0: Stride(form(r1=1), form(2))}


def test_paths_that_step_differently_give_no_step() -> None:
    found = strides("""
    loop:
        r3 = *(u8 *)(r1 + 0)
        if r3 & 1 goto odd
        r1 += 2
        goto next
    odd:
        r1 += 1
    next:
        r2 -= 1
        if r2 != 0 goto loop
        exit
    """)
    assert found == {}


def test_frame_accesses_at_fixed_offsets_are_left_alone() -> None:
    # Unchecked already (or checked on every access in a fully checked module); a
    # stack array indexed by the round is strided like any other.
    found = strides("""
    loop:
        r3 = *(u64 *)(r10 - 8)
        r4 = r10
        r4 += r2
        *(u8 *)(r4 - 64) = r3
        r2 += 1
        if r2 < 64 goto loop
        exit
    """)
    assert found == {3: Stride(form(-64, r2=1, r10=1), form(1))}


def test_a_loop_with_two_latches_is_left_alone() -> None:
    found = strides("""
    loop:
        r3 = *(u8 *)(r1 + 0)
        r1 += 1
        if r3 == 0 goto loop
        r2 -= 1
        if r2 != 0 goto loop
        exit
    """)
    assert found == {}
