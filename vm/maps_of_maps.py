"""Maps that hold ids of other objects: program arrays (`prog_array`) and maps of
maps (`array_of_maps`, `hash_of_maps`), as the kernel's arraymap.c, hashtab.c
and map_in_map.c.

An element holds a u32 id, 0 for none. A program array holds program ids (what
`bpf_tail_call` jumps to; `bpfexec.vm.callbacks` defines them) and is opaque to
programs. A map of maps holds map ids: map n of the same `MapSet` is id n + 1,
and a program's lookup returns that map's handle, which it passes to the map
helpers as any map. As in the kernel, only userspace writes them (here:
`update`, `delete` from Python, and the initial contents of `MapSet`); from a
program, update and delete are -EINVAL. An inner map must match the template
its definition declares (`__array(values, ...)`): type, key and value sizes,
flags, and an array's max_entries unless the template has BPF_F_INNER_MAP; it
cannot itself hold ids.

The ids are kept where programs cannot reach them: the map's region, which a
run maps, is empty.
"""

from __future__ import annotations

from bpfexec.vm.maps_array import ArrayMap
from bpfexec.vm.maps_base import (
    BPF_ANY,
    BPF_EXIST,
    BPF_F_INNER_MAP,
    E2BIG,
    EINVAL,
    ENOENT,
    BpfMap,
    MapDefinition,
    MapType,
    map_handle,
    u32,
)
from bpfexec.vm.maps_hash import HashMap

PROG_ARRAY = 3


class HoldsIds(BpfMap):
    """What program arrays and maps of maps share (before their storage class in the MRO)."""

    def __init__(self, spec: MapDefinition, index: int, kind: MapType) -> None:
        super().__init__(spec, index, kind)
        self.siblings: list[BpfMap] = []  # the maps of the set, to check an inner map's id

    @classmethod
    def problem(cls, spec: MapDefinition, name: str) -> str | None:
        if spec.value_size != 4:
            return f"a {name}'s value_size must be 4 (an id)"
        return super().problem(spec, name)

    @property
    def values(self) -> bytearray:
        return bytearray()  # the ids stay out of program memory

    def link(self, maps: list[BpfMap]) -> None:
        self.siblings = maps

    def accepts(self, ident: int) -> bool:
        """Whether `ident` may be stored (a map's must name a matching inner map)."""
        if self.spec.type == PROG_ARRAY:
            return ident != 0
        if not 0 < ident <= len(self.siblings):
            return False
        inner = self.siblings[ident - 1]
        if isinstance(inner, HoldsIds):
            return False
        template = getattr(self.spec, "inner", None)
        if template is None:
            return True
        spec = inner.spec
        return (
            spec.type == template.type
            and spec.key_size == template.key_size
            and spec.value_size == template.value_size
            and spec.map_flags == template.map_flags
            and (
                not inner.kind.keyed_by_index
                or bool(template.map_flags & BPF_F_INNER_MAP)
                or spec.max_entries == template.max_entries
            )
        )

    def id_at(self, index: int) -> int:
        try:
            key = index.to_bytes(self.spec.key_size, "little")
        except OverflowError:
            return 0
        slot = self.lookup(key)
        return 0 if slot is None else int.from_bytes(self.value(slot), "little")

    def find(self, key: bytes) -> int:
        """The inner map's handle (a program array's elements are not for programs)."""
        slot = self.lookup(key)
        if slot is None or self.spec.type == PROG_ARRAY:
            return 0
        ident = int.from_bytes(self.value(slot), "little")
        return map_handle(ident - 1) if ident else 0

    def program_update(self, key: bytes, value: bytes, flags: int) -> int:
        return -EINVAL

    def program_delete(self, key: bytes) -> int:
        return -EINVAL

    def next_element(self, position: int) -> tuple[int, bytes, int] | None:
        return BpfMap.next_element(self, position)


class IdArray(HoldsIds, ArrayMap):
    """`prog_array`, `array_of_maps`: ids by u32 index."""

    def lookup(self, key: bytes) -> int | None:
        index = int.from_bytes(key, "little")
        if index >= self.spec.max_entries or not any(self.value(index)):
            return None
        return index

    def update(self, key: bytes, value: bytes, flags: int) -> int:
        if flags != BPF_ANY:
            return -EINVAL
        index = int.from_bytes(key, "little")
        if index >= self.spec.max_entries:
            return -E2BIG
        if not self.accepts(int.from_bytes(value[:4], "little")):
            return -EINVAL
        with self.lock:
            self._store(index, value[:4])
        return 0

    def delete(self, key: bytes) -> int:
        index = int.from_bytes(key, "little")
        if index >= self.spec.max_entries:
            return -E2BIG
        with self.lock:
            if not any(self.value(index)):
                return -ENOENT
            self._store(index, u32(0))
        return 0


class HashOfMaps(HoldsIds, HashMap):
    """`hash_of_maps`: map ids by key, with a hash map's update flags."""

    def update(self, key: bytes, value: bytes, flags: int) -> int:
        if flags > BPF_EXIST or not self.accepts(int.from_bytes(value[:4], "little")):
            return -EINVAL
        with self.lock:
            return self._set(key, value[:4], flags)
