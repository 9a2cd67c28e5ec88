"""Helpers the seed document's programs call: max is #1, mul is #42.

Used by tests, and importable by `bpfexec run --helpers seed_helpers:registry`.
"""

from bpfexec.vm import HelperRegistry

registry = HelperRegistry()


@registry.helper(id=1, name="max")
def helper_max(ctx, a, b, c, d, e):
    return max(a, b)


@registry.helper(id=42, name="mul")
def helper_mul(ctx, a, b, c, d, e):
    return a * b
