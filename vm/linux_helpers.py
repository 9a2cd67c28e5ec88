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

A map argument is the handle the program loaded (`lddw r1, map`); anything else
is a HELPER_ERROR trap, where the kernel's verifier would have refused the
program. Keys and values are read from the program's memory, checked as every
access is.
"""

from __future__ import annotations

import functools

from bpfexec.vm.builtin_helpers import bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_trace_printk
from bpfexec.vm.errors import Trap, TrapKind
from bpfexec.vm.helpers import HelperContext, HelperRegistry
from bpfexec.vm.maps import BpfMap

MASK64 = (1 << 64) - 1


def _map(ctx: HelperContext, handle: int) -> BpfMap:
    found = ctx.maps.by_handle(handle) if ctx.maps is not None else None
    if found is None:
        raise Trap(TrapKind.HELPER_ERROR, f"helper {ctx.helper}: {handle:#x} is not a map")
    return found


def bpf_map_lookup_elem(ctx: HelperContext, handle: int, key: int, *_: int) -> int:
    bpf_map = _map(ctx, handle)
    slot = bpf_map.lookup(ctx.read(key, bpf_map.spec.key_size))
    return 0 if slot is None else bpf_map.address(slot)


def bpf_map_update_elem(ctx: HelperContext, handle: int, key: int, value: int, flags: int,
                        *_: int) -> int:  # fmt: skip
    bpf_map = _map(ctx, handle)
    key_bytes = ctx.read(key, bpf_map.spec.key_size)
    value_bytes = ctx.read(value, bpf_map.spec.value_size)
    return bpf_map.update(key_bytes, value_bytes, flags) & MASK64


def bpf_map_delete_elem(ctx: HelperContext, handle: int, key: int, *_: int) -> int:
    bpf_map = _map(ctx, handle)
    return bpf_map.delete(ctx.read(key, bpf_map.spec.key_size)) & MASK64


def bpf_get_smp_processor_id(ctx: HelperContext, *_: int) -> int:
    return 0


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
    return registry
