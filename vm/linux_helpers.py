"""The Linux helper set: helpers at the kernel's numbers, for libbpf-style programs.

A program whose object declares maps or a `license` section (every libbpf-style
object does) is `Program.kernel_helpers`: its numbered helper calls resolve
here first, at the kernel's numbers (`bpf_map_lookup_elem` is 1), then to the
caller's helpers. Any other program keeps the project's numbering, so the seed
document's programs, which call custom helpers 1 and 42, run unchanged; no
flag is needed either way.

| number | helper |
| --- | --- |
| 1 | `bpf_map_lookup_elem(map, key)`: the address of the value, or 0 |
| 2 | `bpf_map_update_elem(map, key, value, flags)`: 0 or a negative errno |
| 3 | `bpf_map_delete_elem(map, key)`: 0 or a negative errno |
| 5 | `bpf_ktime_get_ns()` |
| 6 | `bpf_trace_printk(fmt, fmt_size, ...)`: what `bpf_printk` expands to; a log line |
| 7 | `bpf_get_prandom_u32()` |
| 8 | `bpf_get_smp_processor_id()`: 0 (the VM has one CPU) |
| 12 | `bpf_tail_call(ctx, prog_array, index)`: never returns; -ENOENT if it fails |
| 87 | `bpf_map_push_elem(map, value, flags)`: a queue or stack; 0, -E2BIG when full |
| 88 | `bpf_map_pop_elem(map, value)`: copies the value out; 0, -ENOENT when empty |
| 89 | `bpf_map_peek_elem(map, value)`: as pop, leaving the value in |
| 130 | `bpf_ringbuf_output(ringbuf, data, size, flags)`: 0, -EAGAIN when full |
| 131 | `bpf_ringbuf_reserve(ringbuf, size, flags)`: room in the ring, or 0 |
| 132 | `bpf_ringbuf_submit(data, flags)`: the reserved record becomes an event |
| 133 | `bpf_ringbuf_discard(data, flags)`: the reserved record is dropped |
| 134 | `bpf_ringbuf_query(ringbuf, flags)`: BPF_RB_AVAIL_DATA, _RING_SIZE, _CONS_POS, _PROD_POS |
| 164 | `bpf_for_each_map_elem(map, callback, ctx, flags)`: appended eBPF code |
| 181 | `bpf_loop(nr, callback, ctx, flags)`: appended eBPF code |

12, 164 and 181 are `bpfexec.vm.callbacks`'.

A map argument is the handle the program loaded (`lddw r1, map`); anything else
is a HELPER_ERROR trap, where the kernel's verifier would have refused the
program: so is a queue helper on another map, a ring buffer helper on another
map, and a submit or discard of anything but a reservation still open in this
run. Keys and values are read from the program's memory, checked as every
access is. What each map type does is its class's (`bpfexec.vm.maps`): a
lookup in a map of maps returns the inner map's handle, a ring buffer's
records become the run's events (`HelperContext.emit`).
"""

from __future__ import annotations

import functools

from bpfexec.vm.builtin_helpers import bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_trace_printk
from bpfexec.vm.callbacks import register_callback_helpers
from bpfexec.vm.errors import Trap, TrapKind
from bpfexec.vm.helpers import Event, HelperContext, HelperRegistry
from bpfexec.vm.maps import EAGAIN, EINVAL, ENOENT, BpfMap
from bpfexec.vm.maps_queue import QueueMap
from bpfexec.vm.maps_ringbuf import RingBuffer, RunRing
from bpfexec.vm.memory import MAP0, OFFSET_MASK, REGION_SHIFT, map_base

MASK64 = (1 << 64) - 1
BPF_RB_NO_WAKEUP, BPF_RB_FORCE_WAKEUP = 1, 2  # the only flags of output, submit, discard


def _map(ctx: HelperContext, handle: int) -> BpfMap:
    found = ctx.maps.by_handle(handle) if ctx.maps is not None else None
    if found is None:
        raise Trap(TrapKind.HELPER_ERROR, f"helper {ctx.helper}: {handle:#x} is not a map")
    return found


def _key(ctx: HelperContext, bpf_map: BpfMap, key: int) -> bytes:
    """The key at `key`; a map without keys (a queue's: key_size 0) takes NULL."""
    return ctx.read(key, bpf_map.spec.key_size) if bpf_map.spec.key_size else b""


def bpf_map_lookup_elem(ctx: HelperContext, handle: int, key: int, *_: int) -> int:
    bpf_map = _map(ctx, handle)
    return bpf_map.find(_key(ctx, bpf_map, key))


def bpf_map_update_elem(ctx: HelperContext, handle: int, key: int, value: int, flags: int,
                        *_: int) -> int:  # fmt: skip
    bpf_map = _map(ctx, handle)
    key_bytes = _key(ctx, bpf_map, key)
    value_bytes = ctx.read(value, bpf_map.spec.value_size)
    return bpf_map.program_update(key_bytes, value_bytes, flags) & MASK64


def bpf_map_delete_elem(ctx: HelperContext, handle: int, key: int, *_: int) -> int:
    bpf_map = _map(ctx, handle)
    return bpf_map.program_delete(_key(ctx, bpf_map, key)) & MASK64


def bpf_get_smp_processor_id(ctx: HelperContext, *_: int) -> int:
    return 0


# -- queues and stacks ------------------------------------------------------------------


def _queue(ctx: HelperContext, handle: int) -> QueueMap:
    bpf_map = _map(ctx, handle)
    if not isinstance(bpf_map, QueueMap):
        raise Trap(
            TrapKind.HELPER_ERROR,
            f"helper {ctx.helper}: map {bpf_map.spec.name!r} ({bpf_map.kind.name}) is not a "
            "queue or a stack",
        )
    return bpf_map


def bpf_map_push_elem(ctx: HelperContext, handle: int, value: int, flags: int, *_: int) -> int:
    queue = _queue(ctx, handle)
    return queue.push(ctx.read(value, queue.spec.value_size), flags) & MASK64


def bpf_map_pop_elem(ctx: HelperContext, handle: int, value: int, *_: int) -> int:
    queue = _queue(ctx, handle)
    ctx.view(value, queue.spec.value_size, write=True)  # a bad destination loses nothing
    found = queue.pop()
    if found is None:
        return -ENOENT & MASK64
    ctx.write(value, found)
    return 0


def bpf_map_peek_elem(ctx: HelperContext, handle: int, value: int, *_: int) -> int:
    found = _queue(ctx, handle).peek()
    if found is None:
        return -ENOENT & MASK64
    ctx.write(value, found)
    return 0


# -- ring buffers ---------------------------------------------------------------------


def _ring(ctx: HelperContext, handle: int) -> tuple[RingBuffer, RunRing]:
    """The ring buffer map of `handle` and this run's ring of it."""
    bpf_map = _map(ctx, handle)
    if not isinstance(bpf_map, RingBuffer):
        raise Trap(
            TrapKind.HELPER_ERROR,
            f"helper {ctx.helper}: map {bpf_map.spec.name!r} ({bpf_map.kind.name}) is not a "
            "ring buffer",
        )
    return bpf_map, bpf_map.run_ring(ctx.view(map_base(bpf_map.index), 0).obj)


def bpf_ringbuf_output(ctx: HelperContext, handle: int, data: int, size: int, flags: int,
                       *_: int) -> int:  # fmt: skip
    bpf_map, ring = _ring(ctx, handle)
    if flags & ~(BPF_RB_NO_WAKEUP | BPF_RB_FORCE_WAKEUP):
        return -EINVAL & MASK64
    ctx.charge_bytes(size, f"a ring buffer record of {size} bytes")
    record = ctx.read(data, size)
    if ring.claim(size) is None:
        return -EAGAIN & MASK64
    ctx.emit(Event(bpf_map.spec.name, record))
    return 0


def bpf_ringbuf_reserve(ctx: HelperContext, handle: int, size: int, flags: int, *_: int) -> int:
    bpf_map, ring = _ring(ctx, handle)
    offset = ring.reserve(size) if flags == 0 else None
    return 0 if offset is None else map_base(bpf_map.index) + offset


def _close(ctx: HelperContext, data: int) -> tuple[RingBuffer, bytes]:
    """Close the reservation at `data`: its ring buffer map and contents."""
    n = (data >> REGION_SHIFT) - MAP0
    bpf_map = ctx.maps.maps[n] if ctx.maps is not None and 0 <= n < len(ctx.maps.maps) else None
    if isinstance(bpf_map, RingBuffer):
        record = bpf_map.run_ring(ctx.view(map_base(n), 0).obj).close(data & OFFSET_MASK)
        if record is not None:
            return bpf_map, record
    raise Trap(
        TrapKind.HELPER_ERROR,
        f"helper {ctx.helper}: {data:#x} is not a ring buffer reservation open in this run",
    )


def bpf_ringbuf_submit(ctx: HelperContext, data: int, flags: int, *_: int) -> int:
    bpf_map, record = _close(ctx, data)
    ctx.charge_bytes(len(record), f"a ring buffer record of {len(record)} bytes")
    ctx.emit(Event(bpf_map.spec.name, record))
    return 0


def bpf_ringbuf_discard(ctx: HelperContext, data: int, flags: int, *_: int) -> int:
    _close(ctx, data)
    return 0


def bpf_ringbuf_query(ctx: HelperContext, handle: int, flags: int, *_: int) -> int:
    return _ring(ctx, handle)[1].query(flags)


@functools.cache
def linux_helpers() -> HelperRegistry:
    """The Linux helper set (one registry, shared: it holds no state)."""
    registry = HelperRegistry()
    registry.register(bpf_map_lookup_elem, id=1)
    registry.register(bpf_map_update_elem, id=2)
    registry.register(bpf_map_delete_elem, id=3)
    registry.register(bpf_ktime_get_ns, id=5)
    registry.register(bpf_trace_printk, id=6)
    registry.register(bpf_get_prandom_u32, id=7)
    registry.register(bpf_get_smp_processor_id, id=8)
    registry.register(bpf_map_push_elem, id=87)
    registry.register(bpf_map_pop_elem, id=88)
    registry.register(bpf_map_peek_elem, id=89)
    registry.register(bpf_ringbuf_output, id=130)
    registry.register(bpf_ringbuf_reserve, id=131)
    registry.register(bpf_ringbuf_submit, id=132)
    registry.register(bpf_ringbuf_discard, id=133)
    registry.register(bpf_ringbuf_query, id=134)
    register_callback_helpers(registry)  # bpf_tail_call; bpf_loop's and for_each's own
    return registry
