"""Arrays (`array`, `percpu_array`): the key is a u32 index and every element exists.

The values are the map's region, `max_entries` slots preallocated as the
kernel does; a per-CPU slot is rounded up to 8 bytes (one CPU).
"""

from __future__ import annotations

from bpfexec.vm.maps_base import (
    BPF_EXIST,
    BPF_F_LOCK,
    BPF_NOEXIST,
    E2BIG,
    EEXIST,
    EINVAL,
    BpfMap,
    MapDefinition,
    MapType,
)


def slot_size(spec: MapDefinition, percpu: bool) -> int:
    """Bytes of one element's value: per-CPU values are rounded up to 8 (one CPU)."""
    return (spec.value_size + 7) // 8 * 8 if percpu else spec.value_size


class ArrayMap(BpfMap):
    def __init__(self, spec: MapDefinition, index: int, kind: MapType) -> None:
        super().__init__(spec, index, kind)
        self.slot = slot_size(spec, kind.name.startswith("percpu"))

    @classmethod
    def problem(cls, spec: MapDefinition, name: str) -> str | None:
        if spec.value_size <= 0:
            return "value_size must be positive"
        if spec.key_size != 4:
            return "an array's key_size must be 4"
        return None

    @classmethod
    def region_bytes(cls, spec: MapDefinition) -> int:
        return slot_size(spec, spec.type == 6) * spec.max_entries

    def lookup(self, key: bytes) -> int | None:
        index = int.from_bytes(key, "little")
        return index if index < self.spec.max_entries else None

    def update(self, key: bytes, value: bytes, flags: int) -> int:
        if flags & ~BPF_F_LOCK > BPF_EXIST:
            return -EINVAL
        index = int.from_bytes(key, "little")
        if index >= self.spec.max_entries:
            return -E2BIG
        if flags & ~BPF_F_LOCK == BPF_NOEXIST:
            return -EEXIST  # every element of an array exists
        self._store(index, value)
        return 0

    def next_element(self, position: int) -> tuple[int, bytes, int] | None:
        if position >= self.spec.max_entries:
            return None
        return position + 1, position.to_bytes(4, "little"), self.address(position)

    def entries(self) -> list[tuple[bytes, bytes]]:
        """The elements whose value is not all zero, by index."""
        found = []
        for index in range(self.spec.max_entries):
            value = self.value(index)
            if any(value):
                found.append((index.to_bytes(4, "little"), value))
        return found
