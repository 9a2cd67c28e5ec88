"""Which loops the optimized tier unrolls (`bpfexec.vm.jit.unroll`): the analysis alone.

That unrolled code behaves exactly like the interpreter is tested in
`test_differential.py` (random loops, fuel sweeps)."""

from __future__ import annotations

from support import TWO_PATHS, inner_loops

from bpfexec.vm.jit.unroll import MAX_COPIES, Loop
from bpfexec.vm.loader import load


def loops(text: str) -> dict[int, Loop]:
    return inner_loops(load(text.encode(), name="loops.s"))[0]


def test_a_one_block_loop_is_unrolled_in_full_groups() -> None:
    found = loops("r0 = 0\nloop:\nr0 += r1\nr1 -= 1\nif r1 != 0 goto loop\nexit")
    assert found == {1: Loop(1, frozenset({1}), 3, MAX_COPIES, True)}


def test_the_costliest_path_round_the_loop_sets_the_group_check() -> None:
    found = loops(TWO_PATHS)
    # 2 (head) + 2 (the even path) + 2 (latch); the odd path costs 4.
    assert found[1].max_cost == 6
    assert found[1].body == frozenset({1, 3, 5})


def test_only_the_inner_of_two_nested_loops() -> None:
    found = loops("""
        r0 = 0
    outer:
        r2 = 10
    inner:
        r0 += 1
        r2 -= 1
        if r2 != 0 goto inner
        r1 -= 1
        if r1 != 0 goto outer
        exit
    """)
    assert list(found) == [2]


def test_loops_with_calls_are_not_unrolled() -> None:
    helper = "r0 = 0\nloop:\ncall 1\nr1 -= 1\nif r1 != 0 goto loop\nexit"
    local = "loop:\ncall f\nr1 -= 1\nif r1 != 0 goto loop\nexit\nf:\nr0 = 1\nexit"
    assert loops(helper) == {}
    assert loops(local) == {}


def test_a_jump_back_from_a_block_entered_around_the_head_is_not_part_of_the_loop() -> None:
    # clang's rotated loops: the outer latch (`next`) is entered from before the
    # head, so only the inner latch's blocks are copied.
    found = loops("""
        goto next
    head:
        r0 += 1
        if r0 > 100 goto out
        r2 -= 1
        if r2 != 0 goto head
    out:
        r1 -= 1
    next:
        r2 = 5
        if r1 != 0 goto head
        exit
    """)
    assert set(found) == {1}
    assert found[1].body == frozenset({1, 3})
