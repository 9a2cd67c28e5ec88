"""The standard helpers: answered in-process by every server and by local runs.

Helpers the Linux kernel also has keep the kernel's number and name, so a
program written for the kernel's calling convention runs unchanged:

| number | name                  | semantics                                         |
| 5      | bpf_ktime_get_ns      | monotonic clock in nanoseconds                    |
| 6      | bpf_trace_printk      | (fmt, fmt_size, a1, a2, a3): format into the log  |
| 7      | bpf_get_prandom_u32   | a pseudo-random 32-bit number                     |

The memory helpers have no kernel counterpart; they take C's names (so a
`memcpy` prototype in C resolves by name) and numbers from 0x10000 up, far
outside the kernel's range, for programs that call them by number:

| 0x10000 memcpy(dst, src, n) -> dst   | 0x10002 memset(dst, c, n) -> dst        |
| 0x10001 memcmp(a, b, n) -> <0, 0, >0 | 0x10003 strnlen(s, maxlen) -> length    |

Every memory access goes through the helper context, so it is bounds-checked
exactly like the program's own loads and stores.
"""

from __future__ import annotations

import random
import re
import time

from vm import HelperContext, HelperRegistry

MASK64 = (1 << 64) - 1
MEMORY_HELPERS_BASE = 0x10000
PRINTK_MAX_STRING = 1024  # bytes read for one %s


def standard_helpers() -> HelperRegistry:
    """A fresh registry holding the standard set."""
    registry = HelperRegistry()
    registry.register(bpf_ktime_get_ns, id=5)
    registry.register(bpf_trace_printk, id=6)
    registry.register(bpf_get_prandom_u32, id=7)
    for offset, fn in enumerate((memcpy, memcmp, memset, strnlen)):
        registry.register(fn, id=MEMORY_HELPERS_BASE + offset)
    return registry


def bpf_ktime_get_ns(ctx: HelperContext, *_: int) -> int:
    """Monotonic time in nanoseconds (the server's clock; only differences mean anything)."""
    return time.monotonic_ns()


def bpf_get_prandom_u32(ctx: HelperContext, *_: int) -> int:
    """A pseudo-random 32-bit number (not for cryptography)."""
    return random.getrandbits(32)


def bpf_trace_printk(ctx: HelperContext, fmt: int, fmt_size: int, *args: int) -> int:
    """Format up to three arguments with a printf format into one log line.

    Supports %d %i %u %x %X %c %s %p %% with the length modifiers l and ll; the
    format is `fmt_size` bytes at `fmt` (its NUL, if any, ends it). A trailing
    newline is dropped, since each call is one line. Returns the line's length.
    """
    text = ctx.read(fmt, fmt_size).split(b"\0", 1)[0].decode("utf-8", "replace")
    line = format_printk(ctx, text, args[:3])
    ctx.log(line.removesuffix("\n"))
    return len(line.encode())


_CONVERSION = re.compile(r"%(?P<length>l{0,2})(?P<conv>[diuxXcsp%])|%")


def format_printk(ctx: HelperContext, fmt: str, args: tuple[int, ...]) -> str:
    """The kernel's bpf_trace_printk formatting: without `l`, integers are 32-bit."""
    pending = list(args)

    def convert(match: re.Match[str]) -> str:
        conv = match.group("conv")
        if conv is None:
            raise ValueError(f"unsupported conversion at {fmt[match.start() :][:4]!r} in {fmt!r}")
        if conv == "%":
            return "%"
        if not pending:
            raise ValueError(f"format {fmt!r} has more conversions than the 3 arguments allowed")
        value = pending.pop(0) & MASK64
        bits = 64 if match.group("length") or conv in "ps" else 32
        value &= (1 << bits) - 1
        if conv in "di":
            return str(value - (1 << bits) if value >> (bits - 1) else value)
        if conv == "u":
            return str(value)
        if conv == "x":
            return f"{value:x}"
        if conv == "X":
            return f"{value:X}"
        if conv == "c":
            return chr(value & 0xFF)
        if conv == "p":
            return f"0x{value:x}"
        return ctx.read_cstring(value, PRINTK_MAX_STRING).decode("utf-8", "replace")

    return _CONVERSION.sub(convert, fmt)


def memcpy(ctx: HelperContext, dst: int, src: int, n: int, *_: int) -> int:
    """Copy n bytes from src to dst (overlapping ranges are fine); returns dst."""
    ctx.write(dst, ctx.read(src, n))
    return dst


def memcmp(ctx: HelperContext, a: int, b: int, n: int, *_: int) -> int:
    """Compare n bytes: negative, zero or positive like C's memcmp."""
    left, right = ctx.read(a, n), ctx.read(b, n)
    for x, y in zip(left, right, strict=True):
        if x != y:
            return (x - y) & MASK64
    return 0


def memset(ctx: HelperContext, dst: int, c: int, n: int, *_: int) -> int:
    """Fill n bytes at dst with the byte c; returns dst."""
    # Reading first checks the range, so a huge n traps instead of allocating n bytes.
    ctx.write(dst, bytes([c & 0xFF]) * len(ctx.read(dst, n)))
    return dst


def strnlen(ctx: HelperContext, s: int, maxlen: int, *_: int) -> int:
    """Length of the NUL-terminated string at s, at most maxlen."""
    return len(ctx.read_cstring(s, maxlen))
