"""Hash maps (`hash`, `percpu_hash`, `lru_hash`): values in preallocated slots of
the map's region, keys beside them in Python.

A dict maps each key to its slot (in insertion order; an LRU map moves a key
last when it is used, and evicts the first when full) and a free list holds
the slots no key uses. `bpfexec.vm.maps_lpm` keeps its prefixes the same way.
"""

from __future__ import annotations

from collections import OrderedDict

from bpfexec.vm.maps_array import slot_size
from bpfexec.vm.maps_base import (
    BPF_EXIST,
    BPF_F_LOCK,
    BPF_NOEXIST,
    E2BIG,
    EEXIST,
    EINVAL,
    ENOENT,
    BpfMap,
    MapDefinition,
    MapType,
)


class HashMap(BpfMap):
    full = -E2BIG  # what an update of a new key into a full map returns

    def __init__(self, spec: MapDefinition, index: int, kind: MapType) -> None:
        super().__init__(spec, index, kind)
        self.slot = slot_size(spec, kind.name.startswith("percpu"))
        self.lru = kind.name == "lru_hash"
        self.slots: OrderedDict[bytes, int] = OrderedDict()
        self.keys: dict[int, bytes] = {}  # slot -> key, for walking in slot order
        self.free = list(range(spec.max_entries - 1, -1, -1))

    @classmethod
    def region_bytes(cls, spec: MapDefinition) -> int:
        return slot_size(spec, spec.type == 5) * spec.max_entries

    def lookup(self, key: bytes) -> int | None:
        with self.lock:
            slot = self.slots.get(key)
            if slot is not None and self.lru:
                self.slots.move_to_end(key)
            return slot

    def update(self, key: bytes, value: bytes, flags: int) -> int:
        if flags & ~BPF_F_LOCK > BPF_EXIST:
            return -EINVAL
        with self.lock:
            return self._set(key, value, flags & ~BPF_F_LOCK)

    def _set(self, key: bytes, value: bytes, flags: int) -> int:
        """Store `value` under `key` (flags checked, the lock held)."""
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
                return self.full
            _, evicted = self.slots.popitem(last=False)  # the least recently used
            del self.keys[evicted]
            self.free.append(evicted)
        slot = self.free.pop()
        self.slots[key] = slot
        self.keys[slot] = key
        self._store(slot, value)
        return 0

    def delete(self, key: bytes) -> int:
        with self.lock:
            return self._delete(key)

    def _delete(self, key: bytes) -> int:
        """Remove `key` (the lock held)."""
        slot = self.slots.pop(key, None)
        if slot is None:
            return -ENOENT
        del self.keys[slot]
        self.free.append(slot)
        return 0

    def next_element(self, position: int) -> tuple[int, bytes, int] | None:
        """Walks the slots in order, so a callback may delete the element it is given
        (or any other) without the walk skipping one; a fresh map fills its slots in
        insertion order."""
        with self.lock:
            for slot in range(position, self.spec.max_entries):
                key = self.keys.get(slot)
                if key is not None:
                    return slot + 1, key, self.address(slot)
        return None

    def entries(self) -> list[tuple[bytes, bytes]]:
        """Every element, in insertion order (an LRU map's: least recently used first)."""
        with self.lock:
            return [(key, self.value(slot)) for key, slot in self.slots.items()]
