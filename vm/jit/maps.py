"""Which `bpf_map_lookup_elem` calls the JIT runs inline, and when a run may use them.

A lookup in an array map (`BPF_MAP_TYPE_ARRAY`, `BPF_MAP_TYPE_PERCPU_ARRAY`) is
arithmetic: the key is a u32 index, and the value of element i of map n is at
`map_base(n) + i * slot` (`bpfexec.vm.maps`), or there is none (NULL) when
i >= max_entries. A lookup in a hash map (`BPF_MAP_TYPE_HASH`,
`BPF_MAP_TYPE_PERCPU_HASH`) probes the map's `NativeIndex`
(`bpfexec.vm.maps_hash`) for the key's slot, and asks the helper whenever the
index was changing meanwhile. The compiler (`_FunctionCompiler.inline_lookup`)
emits both at the call sites `lookup_sites` names, for the maps
`inline_arrays` and `inline_hashes` name; the runtime turns it on per run, site
by site, only when `site_inlines` and `maps_match` say the run is the one the
compiler assumed (docs/jit.md, "Inline array lookups", "Inline hash lookups").
Anything else, an LRU or LPM map's handle or a value that is no handle, takes
the helper call as before.

This module decides; it emits no IR and runs nothing.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

from bpfexec.vm.helpers import Helper
from bpfexec.vm.linux_helpers import bpf_map_lookup_elem, linux_helpers
from bpfexec.vm.machine import Machine
from bpfexec.vm.maps import MAP_TYPES, map_handle, slot_size
from bpfexec.vm.maps_hash import INDEXED_TYPES, MAX_INDEXED_ENTRIES, MAX_INDEXED_KEY, HashMap
from bpfexec.vm.memory import MAP0, MAX_MAPS, REGION_SHIFT, map_base
from bpfexec.vm.program import Program

ARRAY_TYPES = (2, 6)  # BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY: the key is the index
# Python's stores to a hash map's index reach other cores in the order it makes them
# only where the hardware keeps stores in order (x86-64's TSO): elsewhere hash
# lookups call the helper (`bpfexec.vm.maps_hash.NativeIndex`).
ORDERED_STORES = platform.machine().lower() in ("x86_64", "amd64")
# What a run's native helper table holds at a site whose lookup runs inline: not a
# function address (page 0 is never mapped), so native code can tell it apart.
INLINE_MARK = 1


@dataclass(frozen=True)
class InlineArray:
    """One array map as the compiler saw it: `r0 = index < max_entries ? base +
    index * slot : 0` is its lookup."""

    index: int  # n: its handle is map_handle(n), its values region MAP0 + n
    type: int
    max_entries: int
    slot: int  # bytes per element, `bpfexec.vm.maps.BpfMap.slot`

    @property
    def handle(self) -> int:
        return map_handle(self.index)

    @property
    def base(self) -> int:
        return map_base(self.index)


@dataclass(frozen=True)
class InlineHash:
    """One hash map as the compiler saw it: its lookup finds the key's slot in the
    map's `NativeIndex` (whose header is entry `position` of the run's
    `map_indexes`), and is `base + slot * self.slot`, or 0 when the key is absent."""

    index: int
    type: int
    key_size: int
    max_entries: int
    slot: int
    position: int  # in the run's table of index headers (`Context.map_indexes`)

    @property
    def handle(self) -> int:
        return map_handle(self.index)

    @property
    def base(self) -> int:
        return map_base(self.index)


def inline_arrays(program: Program) -> tuple[InlineArray, ...]:
    """The maps of `program` whose lookups may run inline: arrays with a 4-byte key
    whose values fit their region, so that `index * slot` for an index below
    max_entries is an offset inside it (none without kernel helpers)."""
    if not program.kernel_helpers:
        return ()
    arrays = []
    for n, spec in enumerate(program.maps[:MAX_MAPS]):
        kind = MAP_TYPES.get(spec.type)
        if spec.type not in ARRAY_TYPES or kind is None or not kind.keyed_by_index:
            continue
        slot = slot_size(spec)  # the one definition of BpfMap.slot
        if spec.key_size != 4 or spec.max_entries <= 0 or slot <= 0:
            continue
        if slot * spec.max_entries > 1 << REGION_SHIFT:
            continue
        arrays.append(InlineArray(n, spec.type, spec.max_entries, slot))
    return tuple(arrays)


def inline_hashes(program: Program) -> tuple[InlineHash, ...]:
    """The maps of `program` whose lookups may probe the map's index inline: `hash` and
    `percpu_hash` maps with an index (keys of at most `MAX_INDEXED_KEY` bytes, at most
    `MAX_INDEXED_ENTRIES` entries) whose values fit their region; none without
    kernel helpers or on a host whose stores may be reordered (`ORDERED_STORES`)."""
    if not program.kernel_helpers or not ORDERED_STORES:
        return ()
    hashes: list[InlineHash] = []
    for n, spec in enumerate(program.maps[:MAX_MAPS]):
        kind = MAP_TYPES.get(spec.type)
        if kind is None or kind.name not in INDEXED_TYPES or kind.implementation is not HashMap:
            continue
        slot = slot_size(spec)
        if not 0 < spec.key_size <= MAX_INDEXED_KEY or slot <= 0:
            continue
        if not 0 < spec.max_entries <= MAX_INDEXED_ENTRIES:
            continue
        if slot * spec.max_entries > 1 << REGION_SHIFT:
            continue
        hashes.append(InlineHash(n, spec.type, spec.key_size, spec.max_entries, slot, len(hashes)))
    return tuple(hashes)


def lookup_sites(program: Program) -> frozenset[int]:
    """The `call` sites of `program` that the Linux helper set resolves to
    `bpf_map_lookup_elem` (the runtime checks each run's helper again)."""
    if not inline_arrays(program) and not inline_hashes(program):
        return frozenset()
    linux = linux_helpers()
    return frozenset(
        pc for pc, ref in program.helper_calls.items() if _is_lookup(linux.resolve(ref))
    )


def _is_lookup(helper: Helper | None) -> bool:
    """Whether calling `helper` is exactly `bpf_map_lookup_elem` of the Linux set, at no
    extra cost. A wrapper (`__wrapped__`, as the server's counting one) is looked
    through; its calls are counted as native code's calls are (`count_calls`)."""
    if helper is None or helper.cost:
        return False
    return getattr(helper.fn, "__wrapped__", helper.fn) is bpf_map_lookup_elem


def site_inlines(machine: Machine, pc: int) -> bool:
    """Whether this run's helper at call site `pc` is the Linux lookup (its identity,
    not its number: a user's registry never takes part in these programs' resolution
    of the kernel's numbers, but this does not rely on it)."""
    return _is_lookup(machine.helpers.get(pc))


def maps_match(
    machine: Machine, arrays: tuple[InlineArray, ...], hashes: tuple[InlineHash, ...] = ()
) -> bool:
    """Whether this run's maps are the ones the compiler assumed: the handle of each
    is the map `bpf_map_lookup_elem` finds, with the same type, sizes and element
    size, its values are the memory region the inline code points into, and each
    hash map has its index (whose header `index_headers` hands native code)."""
    maps = machine.context.maps
    if maps is None:
        return False
    regions = machine.memory.regions
    compiled: list[tuple[InlineArray | InlineHash, int]] = [(a, 4) for a in arrays]
    compiled += [(h, h.key_size) for h in hashes]
    for inline, key_size in compiled:
        found = maps.by_handle(inline.handle)
        if found is None or found.index != inline.index:
            return False
        spec = found.spec
        if (spec.type, spec.key_size, spec.max_entries, found.slot) != (
            inline.type, key_size, inline.max_entries, inline.slot
        ):  # fmt: skip
            return False
        if isinstance(inline, InlineHash) and not (
            isinstance(found, HashMap) and found.native is not None
        ):
            return False
        region = MAP0 + inline.index
        if region >= len(regions) or regions[region] is not found.values:
            return False
        if len(found.values) != inline.slot * inline.max_entries:
            return False
    return True


def index_headers(machine: Machine, hashes: tuple[InlineHash, ...]) -> list[int]:
    """The address of each hash map's index header, by position (after `maps_match`)."""
    maps = machine.context.maps
    assert maps is not None
    headers = []
    for inline in hashes:
        found = maps.by_handle(inline.handle)
        assert isinstance(found, HashMap) and found.native is not None
        headers.append(found.native.address)
    return headers
