"""Property tests of ALU semantics against a reference written from RFC 9669.

The reference below is deliberately independent of the interpreter: it works
on signed Python integers and C-like truncation, where the interpreter works
on unsigned values and masks. Hypothesis feeds both the same operands,
biased towards the edges (0, -1, INT_MIN, shift counts past the width).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfexec import vm

U64 = 1 << 64
U32 = 1 << 32


def wrap(value: int, bits: int) -> int:
    return value % (1 << bits)


def as_signed(value: int, bits: int) -> int:
    value = wrap(value, bits)
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def c_div(a: int, b: int) -> int:
    """C division: the quotient truncated toward zero."""
    quotient = abs(a) // abs(b)
    return quotient if (a >= 0) == (b >= 0) else -quotient


def reference(op: str, a: int, b: int, bits: int) -> int:
    """RFC 9669's result of `a op= b` at width `bits`, zero-extended to 64 bits."""
    ua, ub = wrap(a, bits), wrap(b, bits)
    sa, sb = as_signed(a, bits), as_signed(b, bits)
    results = {
        "+=": ua + ub,
        "-=": ua - ub,
        "*=": ua * ub,
        "/=": ua // ub if ub else 0,
        "%=": ua % ub if ub else ua,
        "s/=": c_div(sa, sb) if sb else 0,
        "s%=": sa - sb * c_div(sa, sb) if sb else sa,
        "|=": ua | ub,
        "&=": ua & ub,
        "^=": ua ^ ub,
        "<<=": ua << (ub % bits),
        ">>=": ua >> (ub % bits),
        "s>>=": sa >> (ub % bits),
    }
    return wrap(results[op], bits)


EDGES = [0, 1, 2, 7, 31, 32, 63, 64, 65, (1 << 31) - 1, 1 << 31, U32 - 1, U32,
         (1 << 63) - 1, 1 << 63, U64 - 1]  # fmt: skip
operands = st.one_of(st.sampled_from(EDGES), st.integers(0, U64 - 1))
OPS = ["+=", "-=", "*=", "/=", "%=", "s/=", "s%=", "|=", "&=", "^=", "<<=", ">>=", "s>>="]


@pytest.mark.parametrize("bits", [64, 32])
@pytest.mark.parametrize("op", OPS)
@settings(max_examples=60, deadline=None)
@given(a=operands, b=operands)
def test_register_operations_match_the_reference(op, bits, a, b):
    reg = "r" if bits == 64 else "w"
    text = f"r0 = r1\n{reg}0 {op} {reg}2\nexit"
    result = vm.execute(vm.load(text.encode()), None, [a, b])
    assert result.return_value == reference(op, a, b, bits)


@pytest.mark.parametrize("op", OPS)
@settings(max_examples=40, deadline=None)
@given(a=operands, imm=st.integers(-(1 << 31), (1 << 31) - 1))
def test_immediates_are_sign_extended_in_64_bit_operations(op, a, imm):
    text = f"r0 = r1\nr0 {op} {imm}\nexit"
    result = vm.execute(vm.load(text.encode()), None, [a])
    assert result.return_value == reference(op, a, imm, 64)


@settings(max_examples=100, deadline=None)
@given(a=operands, b=operands.filter(lambda b: b % U64 != 0))
def test_division_identity(a, b):
    """a == (a / b) * b + a % b, for unsigned and signed division alike."""
    for div, mod, signed in (("/=", "%=", False), ("s/=", "s%=", True)):
        q = vm.execute(vm.load(f"r0 = r1\nr0 {div} r2\nexit".encode()), None, [a, b])
        r = vm.execute(vm.load(f"r0 = r1\nr0 {mod} r2\nexit".encode()), None, [a, b])
        if signed:
            lhs = as_signed(q.return_value, 64) * as_signed(b, 64) + as_signed(r.return_value, 64)
            assert wrap(lhs, 64) == a
        else:
            assert q.return_value * b + r.return_value == a
