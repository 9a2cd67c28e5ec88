"""BPF maps: the kernel's key/value stores, with the kernel's semantics.

A program declares its maps (`SEC(".maps")`, read from BTF by `bpfexec.vm.btf`,
or the legacy `maps` section); the loader keeps their definitions in
`Program.maps` and turns every reference to one (`lddw r1, map`) into its
handle, `map_handle(n)`: an address in region 0, which is never mapped, so a
program that dereferences a handle faults instead of reading anything.

An execution runs with a `MapSet`: one `BpfMap` per definition. By default
each execution gets fresh (zeroed) maps; a caller that keeps a MapSet and
passes it again (`--repeat`, a named state) keeps the contents.

The values of map n are region `MAP0 + n` of the VM's memory (`map_base(n)`):
one bytearray of `max_entries` slots of `value_size` bytes, allocated when the
map is created, as the kernel preallocates. A lookup returns the address of a
slot, which the program reads, writes and uses atomics on like any memory,
bounds-checked by both engines. Keys live beside, in Python: an array's key is
its index; a hash map keeps a dict from key bytes to slot and a free list.

Results follow the kernel: update flags `BPF_ANY`, `BPF_NOEXIST`, `BPF_EXIST`;
0 or a negative errno (`-ENOENT`, `-EEXIST`, `-E2BIG`, `-EINVAL`). Each map has
a lock: update and delete are atomic per element, as in the kernel; values are
shared memory, which a program changes in place (with atomics if it races).
Per-CPU maps have one CPU (`bpf_get_smp_processor_id()` is 0).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

from bpfexec.vm.errors import LimitError, LoadError
from bpfexec.vm.memory import MAX_MAPS, map_base

ENOENT, E2BIG, EEXIST, EINVAL = 2, 7, 17, 22
BPF_ANY, BPF_NOEXIST, BPF_EXIST, BPF_F_LOCK = 0, 1, 2, 4
MAP_HANDLE_BASE = 0x4D41_5000  # map n's handle is MAP_HANDLE_BASE + n (region 0: unmapped)
MAX_VALUE_BYTES = 1 << 32  # one region
BPF_MAP_TYPE_RINGBUF = 27


class MapDefinition(Protocol):
    """What a map is declared as (`bpfexec.vm.btf.MapSpec` is one)."""

    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int


@dataclass(frozen=True)
class MapType:
    number: int
    name: str  # as `--dump-maps` and the kernel's BPF_MAP_TYPE_* names say it
    keyed_by_index: bool  # an array: the key is a u32 index, every element exists


# The map types this VM runs, by the kernel's numbers.
MAP_TYPES = {
    t.number: t
    for t in (
        MapType(1, "hash", False),
        MapType(2, "array", True),
        MapType(5, "percpu_hash", False),
        MapType(6, "percpu_array", True),
        MapType(9, "lru_hash", False),
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


def map_handle(n: int) -> int:
    """The value a program holds for map n (what `lddw r1, map` loads)."""
    return MAP_HANDLE_BASE + n


def check_definitions(definitions: list[Any], where: str, max_bytes: int | None = None) -> None:
    """LoadError naming the first map this VM cannot run, and why; LimitError if
    their values take more than `max_bytes` (`Limits.max_map_bytes`)."""
    if len(definitions) > MAX_MAPS:
        raise LoadError(f"{where}: {len(definitions)} maps, at most {MAX_MAPS}")
    for spec in definitions:
        kind = MAP_TYPES.get(spec.type)
        if kind is None:
            known = KNOWN_TYPES.get(spec.type)
            what = f"type {known} ({spec.type})" if known else f"unknown type {spec.type}"
            raise LoadError(f"{where}: map {spec.name!r}: {what} is not supported")
        if spec.max_entries <= 0:
            raise LoadError(f"{where}: map {spec.name!r}: max_entries must be positive")
        if spec.value_size <= 0:
            raise LoadError(f"{where}: map {spec.name!r}: value_size must be positive")
        if kind.keyed_by_index and spec.key_size != 4:
            raise LoadError(f"{where}: map {spec.name!r}: an array's key_size must be 4")
        if not kind.keyed_by_index and spec.key_size <= 0:
            raise LoadError(f"{where}: map {spec.name!r}: key_size must be positive")
        if _slot_size(spec) * spec.max_entries > MAX_VALUE_BYTES:
            raise LoadError(f"{where}: map {spec.name!r}: its values exceed 4 GiB")
    total = map_bytes(definitions)
    if max_bytes is not None and total > max_bytes:
        raise LimitError(
            f"{where}: its maps take {total} bytes, more than the limit of {max_bytes} "
            "(max_map_bytes)"
        )


def _slot_size(spec: MapDefinition) -> int:
    """Bytes of one element's value: per-CPU values are rounded up to 8 (one CPU)."""
    if MAP_TYPES[spec.type].name.startswith("percpu"):
        return (spec.value_size + 7) // 8 * 8
    return spec.value_size


def map_bytes(definitions: list[Any]) -> int:
    """Memory the maps of these definitions take (their values)."""
    return sum(_slot_size(spec) * spec.max_entries for spec in definitions)


class BpfMap:
    """One map's contents. Thread-safe: executions may share it."""

    def __init__(self, spec: MapDefinition, index: int) -> None:
        self.spec = spec
        self.kind = MAP_TYPES[spec.type]
        self.index = index
        self.slot = _slot_size(spec)
        self.values = bytearray(self.slot * spec.max_entries)
        self.lock = threading.Lock()
        # Hash maps: key -> slot (insertion order; an LRU map moves used keys last).
        self.slots: OrderedDict[bytes, int] = OrderedDict()
        self.free = list(range(spec.max_entries - 1, -1, -1))

    @property
    def lru(self) -> bool:
        return self.kind.name == "lru_hash"

    def address(self, slot: int) -> int:
        """The VM address of a slot's value."""
        return map_base(self.index) + slot * self.slot

    def _index(self, key: bytes) -> int:
        return int.from_bytes(key, "little")

    def lookup(self, key: bytes) -> int | None:
        """The slot of `key`'s value, or None."""
        if self.kind.keyed_by_index:
            index = self._index(key)
            return index if index < self.spec.max_entries else None
        with self.lock:
            slot = self.slots.get(key)
            if slot is not None and self.lru:
                self.slots.move_to_end(key)
            return slot

    def update(self, key: bytes, value: bytes, flags: int) -> int:
        """Set `key`'s value: 0 or a negative errno, as the kernel's update."""
        if flags & ~BPF_F_LOCK > BPF_EXIST:
            return -EINVAL
        flags &= ~BPF_F_LOCK
        if self.kind.keyed_by_index:
            index = self._index(key)
            if index >= self.spec.max_entries:
                return -E2BIG
            if flags == BPF_NOEXIST:
                return -EEXIST  # every element of an array exists
            self._store(index, value)
            return 0
        with self.lock:
            slot = self.slots.get(key)
            if slot is not None:
                if flags == BPF_NOEXIST:
                    return -EEXIST
                if self.lru:
                    self.slots.move_to_end(key)
                self._store(slot, value)
                return 0
            if flags == BPF_EXIST:
                return -ENOENT
            if not self.free:
                if not self.lru:
                    return -E2BIG
                _, evicted = self.slots.popitem(last=False)  # the least recently used
                self.free.append(evicted)
            slot = self.free.pop()
            self.slots[key] = slot
            self._store(slot, value)
            return 0

    def delete(self, key: bytes) -> int:
        if self.kind.keyed_by_index:
            return -EINVAL
        with self.lock:
            slot = self.slots.pop(key, None)
            if slot is None:
                return -ENOENT
            self.free.append(slot)
            return 0

    def _store(self, slot: int, value: bytes) -> None:
        start = slot * self.slot
        self.values[start : start + len(value)] = value

    def value(self, slot: int) -> bytes:
        start = slot * self.slot
        return bytes(self.values[start : start + self.spec.value_size])

    def entries(self) -> list[tuple[bytes, bytes]]:
        """(key, value) pairs: an array's elements whose value is not all zero, a hash
        map's every element, in key order for arrays and insertion order otherwise."""
        if self.kind.keyed_by_index:
            found = []
            for index in range(self.spec.max_entries):
                value = self.value(index)
                if any(value):
                    found.append((index.to_bytes(4, "little"), value))
            return found
        with self.lock:
            return [(key, self.value(slot)) for key, slot in self.slots.items()]

    def dump(self) -> dict[str, object]:
        """The `--dump-maps` form of this map."""
        return {
            "type": self.kind.name,
            "key_size": self.spec.key_size,
            "value_size": self.spec.value_size,
            "max_entries": self.spec.max_entries,
            "entries": [{"key": k.hex(), "value": v.hex()} for k, v in self.entries()],
        }


class MapSet:
    """The maps of one execution, or of several that share them (`--repeat`, a state)."""

    def __init__(self, definitions: list[Any] | tuple[Any, ...]) -> None:
        self.maps = [BpfMap(spec, n) for n, spec in enumerate(definitions)]

    def by_handle(self, handle: int) -> BpfMap | None:
        n = handle - MAP_HANDLE_BASE
        return self.maps[n] if 0 <= n < len(self.maps) else None

    def dump(self) -> dict[str, dict[str, object]]:
        return {m.spec.name: m.dump() for m in self.maps}
