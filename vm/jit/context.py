"""The context block shared by native code and Python: one C struct per execution.

Native code reads its fuel, limits and region table from this struct, and
records a trap in it before unwinding. `Context` is the one definition of the
layout: the compiler derives the LLVM struct type and its field indices from
`Context._fields_`, so the two sides cannot disagree. Every field is 8 bytes
wide, so there is no padding to reason about.

This module holds no execution logic and imports nothing of llvmlite.
"""

from __future__ import annotations

import ctypes
from enum import IntEnum

from bpfexec.vm.isa import NUM_REGISTERS
from bpfexec.vm.memory import REGION_COUNT  # slots of the region table


class Status(IntEnum):
    """What native code returns, and what `Context.status` holds after a trap."""

    OK = 0
    OUT_OF_FUEL = 1  # trap_a: the cost of the block that did not fit
    MEMORY_FAULT = 2  # trap_a: address, trap_b: size, trap_c: an `Access`
    CALL_DEPTH_EXCEEDED = 3
    INTERRUPTED = 4  # the reason is `Machine.interrupt.reason`
    PYTHON = 5  # the dispatcher recorded a Trap (or an exception) on the Python side
    # Not a trap: a packet load outside the packet ended the program, r0 = 0 (the
    # interpreter's `ProgramEnded`); the fuel left is in the context.
    ENDED = 6


class Access(IntEnum):
    """The kind of a faulting memory access, in the words of `Memory.fault`."""

    READ = 0
    WRITE = 1
    ATOMIC = 2

    @property
    def text(self) -> str:
        return ("read", "write", "atomic access")[self]


class Context(ctypes.Structure):
    _fields_ = [
        # First: a native helper gets this struct as its `bpfexec_call *`, whose
        # first member is the api table (`bpfexec.vm.native`).
        ("api", ctypes.c_void_p),
        # r0..r10: initial values in, r0..r5 out; spilled around helper calls.
        ("regs", ctypes.c_uint64 * NUM_REGISTERS),
        ("fuel", ctypes.c_int64),  # what is left of the budget
        ("status", ctypes.c_int64),  # a Status
        ("trap_pc", ctypes.c_int64),
        ("trap_a", ctypes.c_uint64),
        ("trap_b", ctypes.c_uint64),
        ("trap_c", ctypes.c_uint64),
        # r10 of a frame at the deepest call depth allowed: no call is made from it.
        ("deepest_frame", ctypes.c_uint64),
        ("frame_size", ctypes.c_int64),  # bytes r10 moves down per call
        # Poll sites read the interrupt flag once the fuel is below this (never < 0).
        ("poll_at", ctypes.c_int64),
        # Points at a separate word that another thread may set: native code reads
        # it with an atomic load; it must not live inside this (noalias) struct.
        ("interrupt", ctypes.c_void_p),
        ("region_base", ctypes.c_void_p * REGION_COUNT),  # host address of each region
        ("region_read_len", ctypes.c_uint64 * REGION_COUNT),  # 0 where unmapped
        ("region_write_len", ctypes.c_uint64 * REGION_COUNT),  # 0 where read-only
        # Helper calls the run may still make (`Limits.max_helper_calls`): native code
        # counts every `call` here, so both ways of calling a helper count alike.
        ("helper_calls_left", ctypes.c_int64),
        # Per helper call site (numbered in pc order): a native helper's function
        # pointer, or 0 to call through Python; and that helper's extra fuel cost.
        ("native_helpers", ctypes.c_void_p),
        ("native_costs", ctypes.c_void_p),
        # ...and how many times native code called it there (for the helpers' counters).
        ("native_calls", ctypes.c_void_p),
        # The header (`bpfexec.vm.maps_hash.IndexHeader`) of each hash map whose lookups
        # run inline, by `InlineHash.position`: set with the marks of a run's lookup sites.
        ("map_indexes", ctypes.c_void_p),
    ]


FIELD_INDEX = {field[0]: i for i, field in enumerate(Context._fields_)}
