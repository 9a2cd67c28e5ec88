"""The built-in memory and time helpers as native code, for the JIT's helper calls.

`bpfexec.vm.builtin_helpers` defines `memcpy`, `memset`, `memcmp`, `strnlen` and
`bpf_ktime_get_ns` in Python, and the interpreter runs them there. For native
code, this module compiles their twins once per process (LLVM IR below, a few
tens of milliseconds) with the native helper ABI (`bpfexec.vm.native`): a run's
table of call sites points at them wherever the run's helper is one of those
Python functions, so the JIT calls them without entering Python.

Each twin does the work only when it is sure to do exactly what the Python
helper does: every range inside the program's memory (the region table of the
context, as the program's own accesses check it), enough fuel for the bytes
(1 per `BYTES_PER_FUEL`, charged in the context before the work), and none of
the edge cases (a length of 0, a string the fuel cannot pay for). Otherwise it
calls the Python helper itself, through the same entry native code uses for
Python helpers, which raises the exact trap, with the exact message, or does
the edge case. The call site leaves the call's pc in `trap_pc` and the fuel in
the context for that.

`bpf_get_prandom_u32` and `bpf_trace_printk` stay in Python: the first's
numbers come from Python's generator, the second formats text into the log.
"""

from __future__ import annotations

import ctypes
import threading

import llvmlite.binding as llvm

from bpfexec.vm import builtin_helpers
from bpfexec.vm.helpers import BYTES_PER_FUEL, HelperFn
from bpfexec.vm.jit.compiler import CALL_SYMBOL, CONTEXT_TYPE, _field
from bpfexec.vm.memory import OFFSET_MASK, REGION_COUNT, REGION_SHIFT

# The Python functions that have a native twin, and the twin's symbol.
TWINS: dict[HelperFn, str] = {
    builtin_helpers.memcpy: "bpfexec_builtin_memcpy",
    builtin_helpers.memset: "bpfexec_builtin_memset",
    builtin_helpers.memcmp: "bpfexec_builtin_memcmp",
    builtin_helpers.strnlen: "bpfexec_builtin_strnlen",
    builtin_helpers.bpf_ktime_get_ns: "bpfexec_builtin_ktime_get_ns",
}
_MEMCHR, _CLOCK_GETTIME = "bpfexec_memchr", "bpfexec_clock_gettime"
CLOCK_MONOTONIC = 1  # Linux; what time.monotonic_ns() reads
ARGS = "i64 %a, i64 %b, i64 %c, i64 %d, i64 %e"
_FIELDS = {name: _field("%ctx", name) for name in ("fuel", "trap_pc")}

IR = f"""
%ctx = type {CONTEXT_TYPE}

declare i64 @{CALL_SYMBOL}(ptr, i64, i64, i64, i64, i64, i64, i64)
declare ptr @{_MEMCHR}(ptr, i32, i64)
declare i32 @{_CLOCK_GETTIME}(i32, ptr)
declare void @llvm.memmove.p0.p0.i64(ptr, ptr, i64, i1)
declare void @llvm.memset.p0.i64(ptr, i8, i64, i1)
declare i64 @llvm.cttz.i64(i64, i1)

; Bytes of the region of `addr` from `addr` on (read, or write), 0 if none; and
; its host address in %host.
define internal i64 @room(ptr %ctx, i64 %addr, i1 %write, ptr %host) {{
  %region = lshr i64 %addr, {REGION_SHIFT}
  %known = icmp ult i64 %region, {REGION_COUNT}
  br i1 %known, label %mapped, label %none
mapped:
  %rp = {_field("%ctx", "region_read_len", "%region")}
  %wp = {_field("%ctx", "region_write_len", "%region")}
  %rlen = load i64, ptr %rp
  %wlen = load i64, ptr %wp
  %len = select i1 %write, i64 %wlen, i64 %rlen
  %offset = and i64 %addr, {OFFSET_MASK}
  %inside = icmp ult i64 %offset, %len
  br i1 %inside, label %yes, label %none
yes:
  %bp = {_field("%ctx", "region_base", "%region")}
  %base = load ptr, ptr %bp
  %p = getelementptr i8, ptr %base, i64 %offset
  store ptr %p, ptr %host
  %left = sub i64 %len, %offset
  ret i64 %left
none:
  ret i64 0
}}

; The host address of [addr, addr + n) (n > 0), or null if it is not all there.
define internal ptr @range(ptr %ctx, i64 %addr, i64 %n, i1 %write) {{
  %host = alloca ptr
  %left = call i64 @room(ptr %ctx, i64 %addr, i1 %write, ptr %host)
  %fits = icmp ule i64 %n, %left
  br i1 %fits, label %yes, label %no
yes:
  %p = load ptr, ptr %host
  ret ptr %p
no:
  ret ptr null
}}

; Take the fuel for n bytes (n < 2^60) from the context; false, taking nothing,
; if there is not enough.
define internal i1 @charge(ptr %ctx, i64 %n) {{
  %fp = {_FIELDS["fuel"]}
  %fuel = load i64, ptr %fp
  %up = add i64 %n, {BYTES_PER_FUEL - 1}
  %cost = udiv i64 %up, {BYTES_PER_FUEL}
  %enough = icmp sle i64 %cost, %fuel
  br i1 %enough, label %take, label %no
take:
  %rest = sub i64 %fuel, %cost
  store i64 %rest, ptr %fp
  ret i1 true
no:
  ret i1 false
}}

; The Python helper, exactly as the call site would have called it.
define internal i64 @python(ptr %ctx, {ARGS}) noinline {{
  %pp = {_FIELDS["trap_pc"]}
  %pc = load i64, ptr %pp
  %fp = {_FIELDS["fuel"]}
  %fuel = load i64, ptr %fp
  %v = call i64 @{CALL_SYMBOL}(ptr %ctx, i64 %pc, i64 %fuel, {ARGS})
  ret i64 %v
}}

; memcpy(dst = a, src = b, n = c) -> dst, overlapping ranges as memmove
define i64 @bpfexec_builtin_memcpy({ARGS}, ptr %ctx) {{
  %empty = icmp eq i64 %c, 0
  br i1 %empty, label %python, label %check
check:
  %src = call ptr @range(ptr %ctx, i64 %b, i64 %c, i1 false)
  %dst = call ptr @range(ptr %ctx, i64 %a, i64 %c, i1 true)
  %s_ok = icmp ne ptr %src, null
  %d_ok = icmp ne ptr %dst, null
  %both = and i1 %s_ok, %d_ok
  br i1 %both, label %pay, label %python
pay:
  %paid = call i1 @charge(ptr %ctx, i64 %c)
  br i1 %paid, label %copy, label %python
copy:
  call void @llvm.memmove.p0.p0.i64(ptr %dst, ptr %src, i64 %c, i1 false)
  ret i64 %a
python:
  %v = call i64 @python(ptr %ctx, {ARGS})
  ret i64 %v
}}

; memset(dst = a, byte = b, n = c) -> dst
define i64 @bpfexec_builtin_memset({ARGS}, ptr %ctx) {{
  %empty = icmp eq i64 %c, 0
  br i1 %empty, label %python, label %check
check:
  %dst = call ptr @range(ptr %ctx, i64 %a, i64 %c, i1 true)
  %d_ok = icmp ne ptr %dst, null
  br i1 %d_ok, label %pay, label %python
pay:
  %paid = call i1 @charge(ptr %ctx, i64 %c)
  br i1 %paid, label %fill, label %python
fill:
  %byte = trunc i64 %b to i8
  call void @llvm.memset.p0.i64(ptr %dst, i8 %byte, i64 %c, i1 false)
  ret i64 %a
python:
  %v = call i64 @python(ptr %ctx, {ARGS})
  ret i64 %v
}}

; memcmp(a, b, n = c) -> the difference of the first bytes that differ, or 0
define i64 @bpfexec_builtin_memcmp({ARGS}, ptr %ctx) {{
  %empty = icmp eq i64 %c, 0
  br i1 %empty, label %python, label %check
check:
  %pa = call ptr @range(ptr %ctx, i64 %a, i64 %c, i1 false)
  %pb = call ptr @range(ptr %ctx, i64 %b, i64 %c, i1 false)
  %a_ok = icmp ne ptr %pa, null
  %b_ok = icmp ne ptr %pb, null
  %both = and i1 %a_ok, %b_ok
  br i1 %both, label %pay, label %python
pay:
  %paid = call i1 @charge(ptr %ctx, i64 %c)
  br i1 %paid, label %words, label %python
words:                                   ; 8 bytes at a time while 8 are left
  %i = phi i64 [ 0, %pay ], [ %next, %same ]
  %end = add i64 %i, 8
  %more = icmp ule i64 %end, %c
  br i1 %more, label %word, label %bytes
word:
  %wa = getelementptr i8, ptr %pa, i64 %i
  %wb = getelementptr i8, ptr %pb, i64 %i
  %x = load i64, ptr %wa, align 1
  %y = load i64, ptr %wb, align 1
  %diff = xor i64 %x, %y
  %equal = icmp eq i64 %diff, 0
  br i1 %equal, label %same, label %differ
same:
  %next = add i64 %i, 8
  br label %words
differ:                                  ; little-endian: the lowest set bit is the first byte
  %bit = call i64 @llvm.cttz.i64(i64 %diff, i1 true)
  %byte = lshr i64 %bit, 3
  %at = add i64 %i, %byte
  br label %found
bytes:                                   ; the last 0..7 bytes
  %j = phi i64 [ %i, %words ], [ %j1, %equal_byte ]
  %done = icmp eq i64 %j, %c
  br i1 %done, label %zero, label %byte_check
byte_check:
  %ba = getelementptr i8, ptr %pa, i64 %j
  %bb = getelementptr i8, ptr %pb, i64 %j
  %ua = load i8, ptr %ba
  %ub = load i8, ptr %bb
  %eq = icmp eq i8 %ua, %ub
  %j1 = add i64 %j, 1
  br i1 %eq, label %equal_byte, label %found_tail
equal_byte:
  br label %bytes
found_tail:
  br label %found
found:
  %k = phi i64 [ %at, %differ ], [ %j, %found_tail ]
  %fa = getelementptr i8, ptr %pa, i64 %k
  %fb = getelementptr i8, ptr %pb, i64 %k
  %va = load i8, ptr %fa
  %vb = load i8, ptr %fb
  %za = zext i8 %va to i64
  %zb = zext i8 %vb to i64
  %r = sub i64 %za, %zb
  ret i64 %r
zero:
  ret i64 0
python:
  %v = call i64 @python(ptr %ctx, {ARGS})
  ret i64 %v
}}

; strnlen(s = a, maxlen = b): the scan never goes past the region, maxlen or what
; the fuel pays for; a NUL within, or maxlen bytes, is the fast case.
define i64 @bpfexec_builtin_strnlen({ARGS}, ptr %ctx) {{
  %host = alloca ptr
  %empty = icmp eq i64 %b, 0
  br i1 %empty, label %python, label %check
check:
  %room = call i64 @room(ptr %ctx, i64 %a, i1 false, ptr %host)
  %fp = {_FIELDS["fuel"]}
  %fuel = load i64, ptr %fp
  %rich = icmp ugt i64 %fuel, {(1 << 60) - 1}
  %paid_bytes = mul i64 %fuel, {BYTES_PER_FUEL}
  %affordable = select i1 %rich, i64 -1, i64 %paid_bytes
  %limit = call i64 @llvm.umin.i64(i64 %b, i64 %affordable)
  %scan = call i64 @llvm.umin.i64(i64 %limit, i64 %room)
  %nothing = icmp eq i64 %scan, 0
  br i1 %nothing, label %python, label %search
search:
  %p = load ptr, ptr %host
  %nul = call ptr @{_MEMCHR}(ptr %p, i32 0, i64 %scan)
  %found = icmp ne ptr %nul, null
  br i1 %found, label %length, label %whole
length:
  %pi = ptrtoint ptr %p to i64
  %ni = ptrtoint ptr %nul to i64
  %len = sub i64 %ni, %pi
  %scanned = add i64 %len, 1
  %paid = call i1 @charge(ptr %ctx, i64 %scanned)
  br i1 %paid, label %done, label %python
done:
  ret i64 %len
whole:                                   ; no NUL: maxlen bytes scanned, or not the fast case
  %all = icmp eq i64 %scan, %b
  br i1 %all, label %pay_all, label %python
pay_all:
  %paid_all = call i1 @charge(ptr %ctx, i64 %b)
  br i1 %paid_all, label %max, label %python
max:
  ret i64 %b
python:
  %v = call i64 @python(ptr %ctx, {ARGS})
  ret i64 %v
}}
declare i64 @llvm.umin.i64(i64, i64)

; bpf_ktime_get_ns(): CLOCK_MONOTONIC in nanoseconds, as time.monotonic_ns()
define i64 @bpfexec_builtin_ktime_get_ns({ARGS}, ptr %ctx) {{
  %ts = alloca {{ i64, i64 }}
  %ok = call i32 @{_CLOCK_GETTIME}(i32 {CLOCK_MONOTONIC}, ptr %ts)
  %sp = getelementptr {{ i64, i64 }}, ptr %ts, i32 0, i32 0
  %np = getelementptr {{ i64, i64 }}, ptr %ts, i32 0, i32 1
  %sec = load i64, ptr %sp
  %nsec = load i64, ptr %np
  %ns = mul i64 %sec, 1000000000
  %t = add i64 %ns, %nsec
  ret i64 %t
}}
"""

_lock = threading.Lock()
_addresses: dict[HelperFn, int] | None = None
_engine: object = None  # owns the machine code: alive for the process


def twin_addresses() -> dict[HelperFn, int]:
    """Python builtin -> the address of its native twin; compiled on first use."""
    global _addresses, _engine
    if _addresses is None:
        from bpfexec.vm.jit import runtime

        with _lock:
            if _addresses is None:
                libc = ctypes.CDLL(None)
                llvm.add_symbol(_MEMCHR, ctypes.cast(libc.memchr, ctypes.c_void_p).value)
                llvm.add_symbol(
                    _CLOCK_GETTIME, ctypes.cast(libc.clock_gettime, ctypes.c_void_p).value
                )
                code = runtime.emit_object(IR, quick=False)
                _engine, addresses = runtime.load_functions(code, list(TWINS.values()))
                _addresses = {fn: addresses[symbol] for fn, symbol in TWINS.items()}
    return _addresses
