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

Fuel: on top of the call instruction, a helper that works on memory charges
1 fuel per 8 bytes it works on, rounded up (`bpfexec.vm.helpers.BYTES_PER_FUEL`),
before doing the work: `memcpy`, `memcmp` and `memset` their `n`, `strnlen` and
each `%s` of `bpf_trace_printk` the bytes they scan (the NUL included),
`bpf_trace_printk` its `fmt_size`. A range that is out of bounds traps
MEMORY_FAULT first; a budget that cannot pay traps OUT_OF_FUEL with the work
not done. The work itself runs at C speed (`bytes.find`, memoryview copies,
chunked compares), never a Python loop per byte; docs/hardening.md has the
figures behind the rate.
"""

from __future__ import annotations

import random
import re
import time

from bpfexec.vm import HelperContext, HelperRegistry, Trap, TrapKind
from bpfexec.vm.helpers import HelperFn

MASK64 = (1 << 64) - 1
MEMORY_HELPERS_BASE = 0x10000
PRINTK_MAX_STRING = 1024  # bytes read for one %s
COMPARE_CHUNK = 64 << 10  # memcmp compares this many bytes at a time


def standard_helpers() -> HelperRegistry:
    """A fresh registry holding the standard set."""
    registry = HelperRegistry()
    registry.register(bpf_ktime_get_ns, id=5)
    registry.register(bpf_trace_printk, id=6)
    registry.register(bpf_get_prandom_u32, id=7)
    memory_helpers: tuple[HelperFn, ...] = (memcpy, memcmp, memset, strnlen)
    for offset, fn in enumerate(memory_helpers):
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
    Costs 1 fuel per 8 bytes of `fmt_size`, and of each %s string scanned.
    """
    view = ctx.view(fmt, fmt_size)  # a bad range is a MEMORY_FAULT before any charge
    ctx.charge_bytes(fmt_size, f"a format of {fmt_size} bytes")
    text = bytes(view).split(b"\0", 1)[0].decode("utf-8", "replace")
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
        return read_cstring_charged(ctx, value, PRINTK_MAX_STRING).decode("utf-8", "replace")

    return _CONVERSION.sub(convert, fmt)


def read_cstring_charged(ctx: HelperContext, addr: int, max_len: int) -> bytes:
    """The NUL-terminated string at `addr` (at most `max_len` bytes), paid for.

    The cost is 1 fuel per 8 bytes scanned, the NUL included (`max_len` when
    there is none within it). The scan never goes beyond what the fuel left pays
    for: a string that goes on past that is OUT_OF_FUEL, nothing charged and
    nothing more scanned, so a small budget buys a small scan.
    """
    affordable = ctx.affordable_bytes()
    limit = max_len if affordable is None else min(max_len, affordable)
    text = ctx.read_cstring(addr, limit)
    if len(text) < limit:
        scanned = len(text) + 1  # the NUL
    elif limit == max_len:
        scanned = max(max_len, 0)
    else:
        raise Trap(
            TrapKind.OUT_OF_FUEL,
            f"helper {ctx.helper}: the string at {addr:#x} goes on past the {limit} bytes "
            f"the {ctx.fuel_left} fuel left pays for",
        )
    ctx.charge_bytes(scanned, f"scanning {scanned} bytes")
    return text


def memcpy(ctx: HelperContext, dst: int, src: int, n: int, *_: int) -> int:
    """Copy n bytes from src to dst (overlapping ranges are fine); returns dst.
    Costs 1 fuel per 8 bytes of n."""
    source, target = ctx.view(src, n), ctx.view(dst, n, write=True)
    ctx.charge_bytes(n, f"copying {n} bytes")
    target[:] = source  # memmove: overlapping ranges copy as if through a buffer
    return dst


def memcmp(ctx: HelperContext, a: int, b: int, n: int, *_: int) -> int:
    """Compare n bytes: negative, zero or positive like C's memcmp (the difference of
    the first bytes that differ, modulo 2**64). Costs 1 fuel per 8 bytes of n."""
    left, right = ctx.view(a, n), ctx.view(b, n)
    ctx.charge_bytes(n, f"comparing {n} bytes")
    for start in range(0, n, COMPARE_CHUNK):
        x = bytes(left[start : start + COMPARE_CHUNK])
        y = bytes(right[start : start + COMPARE_CHUNK])
        if x != y:
            # The first byte that differs: the highest set bit of x ^ y, read big-endian.
            diff = int.from_bytes(x, "big") ^ int.from_bytes(y, "big")
            at = len(x) - 1 - (diff.bit_length() - 1) // 8
            return (x[at] - y[at]) & MASK64
    return 0


def memset(ctx: HelperContext, dst: int, c: int, n: int, *_: int) -> int:
    """Fill n bytes at dst with the byte c; returns dst. Costs 1 fuel per 8 bytes of n."""
    target = ctx.view(dst, n, write=True)  # checks the range: a huge n traps, allocates nothing
    ctx.charge_bytes(n, f"filling {n} bytes")
    if n:
        target[0] = c & 0xFF
        done = 1
        while done < n:  # double the filled prefix: log2(n) copies, no n-byte temporary
            step = min(done, n - done)
            target[done : done + step] = target[:step]
            done += step
    return dst


def strnlen(ctx: HelperContext, s: int, maxlen: int, *_: int) -> int:
    """Length of the NUL-terminated string at s, at most maxlen. Costs 1 fuel per 8
    bytes scanned (the NUL included); the scan stops where the fuel left does."""
    return len(read_cstring_charged(ctx, s, maxlen))
