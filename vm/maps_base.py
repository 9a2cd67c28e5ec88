"""What every BPF map type shares: the kernel's constants, the map handle, and
`BpfMap`, the base class of the per-type classes (`bpfexec.vm.maps` picks one
per definition).

A subclass says what a definition of its type must look like (`problem`), how
much memory one takes (`memory`), which bytes a run maps as the map's region
(`values`) and what each operation does; results are the kernel's: 0 or a
negative errno. This module holds no map type of its own.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

from bpfexec.vm.errors import Trap, TrapKind
from bpfexec.vm.memory import map_base

ENOENT, E2BIG, EAGAIN, EEXIST, EINVAL, ENOSPC = 2, 7, 11, 17, 22, 28
BPF_ANY, BPF_NOEXIST, BPF_EXIST, BPF_F_LOCK = 0, 1, 2, 4
BPF_F_NO_PREALLOC = 1  # map_flags
BPF_F_INNER_MAP = 1 << 12  # map_flags of an inner map whose max_entries may differ
MAP_HANDLE_BASE = 0x4D41_5000  # map n's handle is MAP_HANDLE_BASE + n (region 0: unmapped)
MAX_VALUE_BYTES = 1 << 32  # one region


def map_handle(n: int) -> int:
    """The value a program holds for map n (what `lddw r1, map` loads)."""
    return MAP_HANDLE_BASE + n


def u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


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
    implementation: type[BpfMap]


class BpfMap:
    """One map's contents. Thread-safe: executions may share it.

    The defaults are those of a map that holds nothing a program may look up:
    lookup finds nothing, update and delete are -EINVAL.
    """

    def __init__(self, spec: MapDefinition, index: int, kind: MapType) -> None:
        self.spec = spec
        self.kind = kind
        self.index = index
        self.slot = spec.value_size  # bytes between two values in the region
        self.lock = threading.Lock()
        self._values = bytearray(self.region_bytes(spec))

    # -- the definition ---------------------------------------------------------------

    @classmethod
    def problem(cls, spec: MapDefinition, name: str) -> str | None:
        """What is wrong with a definition of this type (called `name`), or None."""
        if spec.value_size <= 0:
            return "value_size must be positive"
        if spec.key_size <= 0:
            return "key_size must be positive"
        return None

    @classmethod
    def region_bytes(cls, spec: MapDefinition) -> int:
        """Bytes of the map's region (program memory), allocated with the map."""
        return spec.value_size * spec.max_entries

    @classmethod
    def memory(cls, spec: MapDefinition) -> int:
        """Bytes the map takes (what `Limits.max_map_bytes` counts)."""
        return cls.region_bytes(spec)

    # -- program memory -------------------------------------------------------------------

    @property
    def values(self) -> bytearray:
        """The region a run maps as this map's (`bpfexec.vm.machine.prepare`)."""
        return self._values

    def address(self, slot: int) -> int:
        """The VM address of a slot's value."""
        return map_base(self.index) + slot * self.slot

    def value(self, slot: int) -> bytes:
        start = slot * self.slot
        return bytes(self._values[start : start + self.spec.value_size])

    def _store(self, slot: int, value: bytes) -> None:
        start = slot * self.slot
        self._values[start : start + len(value)] = value

    # -- operations -------------------------------------------------------------------

    def lookup(self, key: bytes) -> int | None:
        """The slot of `key`'s value, or None."""
        return None

    def update(self, key: bytes, value: bytes, flags: int) -> int:
        """Set `key`'s value, as userspace's BPF_MAP_UPDATE_ELEM: 0 or a negative errno."""
        return -EINVAL

    def delete(self, key: bytes) -> int:
        """Remove `key`, as userspace's BPF_MAP_DELETE_ELEM: 0 or a negative errno."""
        return -EINVAL

    def find(self, key: bytes) -> int:
        """What `bpf_map_lookup_elem` returns to a program: the address of the value, or 0."""
        slot = self.lookup(key)
        return 0 if slot is None else self.address(slot)

    def program_update(self, key: bytes, value: bytes, flags: int) -> int:
        """`bpf_map_update_elem` from a program (some types allow it to userspace only)."""
        return self.update(key, value, flags)

    def program_delete(self, key: bytes) -> int:
        """`bpf_map_delete_elem` from a program."""
        return self.delete(key)

    def id_at(self, index: int) -> int:
        """The u32 id element `index` of a program array or a map of maps holds; 0 if
        it is empty, out of range, or the map holds no ids."""
        return 0

    def next_element(self, position: int) -> tuple[int, bytes, int] | None:
        """For `bpf_for_each_map_elem`: the element at or after the cursor `position`
        (0 to start) as (the cursor past it, its key, its value's address), or None
        at the end. Only arrays and hash maps can be walked, as in the kernel."""
        raise Trap(
            TrapKind.HELPER_ERROR,
            f"bpf_for_each_map_elem: map {self.spec.name!r} ({self.kind.name}) cannot be walked",
        )

    def entries(self) -> list[tuple[bytes, bytes]]:
        """(key, value) pairs, as `--dump-maps` lists them."""
        return []

    def dump(self) -> dict[str, object]:
        """The `--dump-maps` form of this map."""
        return {
            "type": self.kind.name,
            "key_size": self.spec.key_size,
            "value_size": self.spec.value_size,
            "max_entries": self.spec.max_entries,
            "entries": [{"key": k.hex(), "value": v.hex()} for k, v in self.entries()],
        }

    def link(self, maps: list[BpfMap]) -> None:
        """Called once every map of the set exists (a map of maps checks its inner maps)."""
