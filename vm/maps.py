"""BPF maps: the kernel's key/value stores, with the kernel's semantics.

A program declares its maps (`SEC(".maps")`, read from BTF by `bpfexec.vm.btf`,
or the legacy `maps` section); the loader keeps their definitions in
`Program.maps` and turns every reference to one (`lddw r1, map`) into its
handle, `map_handle(n)`: an address in region 0, which is never mapped, so a
program that dereferences a handle faults instead of reading anything.

An execution runs with a `MapSet`: one `BpfMap` per definition, of the class
its type names in `MAP_TYPES`. By default each execution gets fresh (zeroed)
maps; a caller that keeps a MapSet and passes it again (`--repeat`, a named
state) keeps the contents.

The values of map n are region `MAP0 + n` of the VM's memory (`map_base(n)`),
allocated when the map is created, as the kernel preallocates. A lookup
returns the address of a value, which the program reads, writes and uses
atomics on like any memory, bounds-checked by both engines. Keys live beside,
in Python. The types, one module each:

- `bpfexec.vm.maps_array`: `array`, `percpu_array`;
- `bpfexec.vm.maps_hash`: `hash`, `percpu_hash`, `lru_hash`;
- `bpfexec.vm.maps_lpm`: `lpm_trie`;
- `bpfexec.vm.maps_queue`: `queue`, `stack` (values by copy, no region);
- `bpfexec.vm.maps_ringbuf`: `ringbuf` (records become the run's events; each
  run maps a ring of its own);
- `bpfexec.vm.maps_of_maps`: `prog_array`, `array_of_maps`, `hash_of_maps`
  (ids, out of the programs' reach).

Results follow the kernel: update flags `BPF_ANY`, `BPF_NOEXIST`, `BPF_EXIST`;
0 or a negative errno. Each map has a lock: update and delete are atomic per
element, as in the kernel; values are shared memory, which a program changes
in place (with atomics if it races). Per-CPU maps have one CPU
(`bpf_get_smp_processor_id()` is 0).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from bpfexec.vm.errors import LimitError, LoadError
from bpfexec.vm.maps_array import ArrayMap
from bpfexec.vm.maps_base import (
    BPF_ANY,
    BPF_EXIST,
    BPF_F_LOCK,
    BPF_F_NO_PREALLOC,
    BPF_NOEXIST,
    E2BIG,
    EAGAIN,
    EEXIST,
    EINVAL,
    ENOENT,
    ENOSPC,
    MAP_HANDLE_BASE,
    MAX_VALUE_BYTES,
    BpfMap,
    MapDefinition,
    MapType,
    map_handle,
)
from bpfexec.vm.maps_hash import HashMap
from bpfexec.vm.maps_lpm import LpmTrie
from bpfexec.vm.maps_of_maps import HashOfMaps, IdArray
from bpfexec.vm.maps_queue import QueueMap
from bpfexec.vm.maps_ringbuf import RingBuffer
from bpfexec.vm.memory import MAX_MAPS

__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_F_LOCK",
    "BPF_F_NO_PREALLOC",
    "BPF_MAP_TYPE_RINGBUF",
    "BPF_NOEXIST",
    "E2BIG",
    "EAGAIN",
    "EEXIST",
    "EINVAL",
    "ENOENT",
    "ENOSPC",
    "KNOWN_TYPES",
    "MAP_HANDLE_BASE",
    "MAP_TYPES",
    "BpfMap",
    "MapDefinition",
    "MapSet",
    "MapType",
    "check_definitions",
    "map_bytes",
    "map_handle",
    "slot_size",
]

BPF_MAP_TYPE_RINGBUF = 27

# The map types this VM runs, by the kernel's numbers.
MAP_TYPES = {
    t.number: t
    for t in (
        MapType(1, "hash", False, HashMap),
        MapType(2, "array", True, ArrayMap),
        MapType(3, "prog_array", True, IdArray),
        MapType(5, "percpu_hash", False, HashMap),
        MapType(6, "percpu_array", True, ArrayMap),
        MapType(9, "lru_hash", False, HashMap),
        MapType(11, "lpm_trie", False, LpmTrie),
        MapType(12, "array_of_maps", True, IdArray),
        MapType(13, "hash_of_maps", False, HashOfMaps),
        MapType(22, "queue", False, QueueMap),
        MapType(23, "stack", False, QueueMap),
        MapType(BPF_MAP_TYPE_RINGBUF, "ringbuf", False, RingBuffer),
    )
}
# Kernel map types known by name, for a clear refusal.
KNOWN_TYPES = {
    3: "prog_array", 4: "perf_event_array", 7: "stack_trace", 8: "cgroup_array",
    10: "lru_percpu_hash", 11: "lpm_trie", 12: "array_of_maps", 13: "hash_of_maps",
    14: "devmap", 15: "sockmap", 16: "cpumap", 17: "xskmap", 18: "sockhash",
    19: "cgroup_storage", 20: "reuseport_sockarray", 21: "percpu_cgroup_storage",
    22: "queue", 23: "stack", 24: "sk_storage", 25: "devmap_hash", 26: "struct_ops",
    27: "ringbuf", 28: "inode_storage", 29: "task_storage", 30: "bloom_filter",
}  # fmt: skip


def check_definitions(definitions: list[Any], where: str, max_bytes: int | None = None) -> None:
    """LoadError naming the first map this VM cannot run, and why; LimitError if
    they take more than `max_bytes` (`Limits.max_map_bytes`)."""
    if len(definitions) > MAX_MAPS:
        raise LoadError(f"{where}: {len(definitions)} maps, at most {MAX_MAPS}")
    for spec in definitions:
        kind = MAP_TYPES.get(spec.type)
        if kind is None:
            known = KNOWN_TYPES.get(spec.type)
            what = f"type {known} ({spec.type})" if known else f"unknown type {spec.type}"
            raise LoadError(f"{where}: map {spec.name!r}: {what} is not supported")
        problem = (
            "max_entries must be positive"
            if spec.max_entries <= 0
            else kind.implementation.problem(spec, kind.name)
        )
        if problem is None and kind.implementation.region_bytes(spec) > MAX_VALUE_BYTES:
            problem = "its values exceed 4 GiB"
        if problem is not None:
            raise LoadError(f"{where}: map {spec.name!r}: {problem}")
    total = map_bytes(definitions)
    if max_bytes is not None and total > max_bytes:
        raise LimitError(
            f"{where}: its maps take {total} bytes, more than the limit of {max_bytes} "
            "(max_map_bytes)"
        )


def slot_size(spec: MapDefinition) -> int:
    """Bytes between two values of an array or hash map (`BpfMap.slot`): per-CPU values
    are rounded up to 8 (one CPU)."""
    return MAP_TYPES[spec.type].implementation.region_bytes(spec) // spec.max_entries


def map_bytes(definitions: list[Any]) -> int:
    """Memory the maps of these definitions take (their values, ids or ring)."""
    return sum(MAP_TYPES[spec.type].implementation.memory(spec) for spec in definitions)


class MapSet:
    """The maps of one execution, or of several that share them (`--repeat`, a state).

    `init` is the initial contents of program arrays and maps of maps: (map index,
    u32 key, u32 id) triples, from libbpf's `values = { [i] = &x }` (`Program.map_init`).
    """

    def __init__(
        self,
        definitions: list[Any] | tuple[Any, ...],
        init: Iterable[tuple[int, int, int]] = (),
    ) -> None:
        self.maps: list[BpfMap] = [
            MAP_TYPES[spec.type].implementation(spec, n, MAP_TYPES[spec.type])
            for n, spec in enumerate(definitions)
        ]
        for bpf_map in self.maps:
            bpf_map.link(self.maps)
        for n, key, ident in init:
            target = self.maps[n]
            result = target.update(
                key.to_bytes(target.spec.key_size, "little"), ident.to_bytes(4, "little"), BPF_ANY
            )
            if result:
                raise LoadError(
                    f"map {target.spec.name!r}: element {key} cannot hold id {ident} "
                    f"(errno {-result})"
                )

    def by_handle(self, handle: int) -> BpfMap | None:
        n = handle - MAP_HANDLE_BASE
        return self.maps[n] if 0 <= n < len(self.maps) else None

    def dump(self) -> dict[str, dict[str, object]]:
        return {m.spec.name: m.dump() for m in self.maps}
