"""Longest-prefix-match tries (`lpm_trie`), as the kernel's kernel/bpf/lpm_trie.c.

A key is `struct { u32 prefixlen; u8 data[]; }`: `prefixlen` leading bits of
`data`, most significant bit first (network order). An element is stored
under its prefix alone: prefixlen and data with the bits past prefixlen
cleared, so 10.1.2.3/8 and 10.0.0.0/8 are the same element (the dump shows the
cleared form). Update and delete name an element exactly; a lookup finds the
element with the longest prefix that matches the key's first prefixlen bits
(a program passes prefixlen = all the data's bits, an address). The kernel
walks a trie; this keeps the prefixes in a dict, as a hash map keeps its keys,
and tries the prefix lengths in use from the longest down.

Update flags are the kernel's since 6.14: BPF_NOEXIST on an existing prefix is
-EEXIST, BPF_EXIST on a missing one -ENOENT, and replacing a prefix of a full
trie succeeds; a new prefix in a full trie is -ENOSPC.
"""

from __future__ import annotations

from collections import Counter

from bpfexec.vm.maps_base import (
    BPF_EXIST,
    BPF_F_NO_PREALLOC,
    EINVAL,
    ENOSPC,
    BpfMap,
    MapDefinition,
    MapType,
)
from bpfexec.vm.maps_hash import HashMap

MAX_DATA_BYTES = 256  # the kernel's LPM_DATA_SIZE_MAX


class LpmTrie(HashMap):
    full = -ENOSPC

    def __init__(self, spec: MapDefinition, index: int, kind: MapType) -> None:
        super().__init__(spec, index, kind)
        self.bits = (spec.key_size - 4) * 8  # the longest prefix
        self.lengths: Counter[int] = Counter()  # prefix lengths in use -> how many

    @classmethod
    def problem(cls, spec: MapDefinition, name: str) -> str | None:
        if not spec.map_flags & BPF_F_NO_PREALLOC:
            return "an lpm_trie needs map_flags BPF_F_NO_PREALLOC (1), as the kernel requires"
        if not 4 < spec.key_size <= 4 + MAX_DATA_BYTES:
            return (
                f"an lpm_trie's key_size must be 4 (prefixlen) + 1 to {MAX_DATA_BYTES} data "
                f"bytes, got {spec.key_size}"
            )
        if spec.value_size <= 0:
            return "value_size must be positive"
        return None

    @classmethod
    def region_bytes(cls, spec: MapDefinition) -> int:
        return spec.value_size * spec.max_entries

    def _prefix(self, key: bytes, length: int) -> bytes:
        """The element key of the first `length` bits of `key`'s data."""
        data = int.from_bytes(key[4:], "big")
        kept = data >> (self.bits - length) << (self.bits - length)
        return length.to_bytes(4, "little") + kept.to_bytes(len(key) - 4, "big")

    def lookup(self, key: bytes) -> int | None:
        """The slot of the longest prefix matching `key`, or None."""
        wanted = min(int.from_bytes(key[:4], "little"), self.bits)
        with self.lock:
            for length in sorted(self.lengths, reverse=True):
                if length <= wanted:
                    slot = self.slots.get(self._prefix(key, length))
                    if slot is not None:
                        return slot
        return None

    def update(self, key: bytes, value: bytes, flags: int) -> int:
        if flags > BPF_EXIST:
            return -EINVAL
        length = int.from_bytes(key[:4], "little")
        if length > self.bits:
            return -EINVAL
        prefix = self._prefix(key, length)
        with self.lock:
            new = prefix not in self.slots
            result = self._set(prefix, value, flags)
            if result == 0 and new:
                self.lengths[length] += 1
            return result

    def delete(self, key: bytes) -> int:
        length = int.from_bytes(key[:4], "little")
        if length > self.bits:
            return -EINVAL
        with self.lock:
            result = self._delete(self._prefix(key, length))
            if result == 0:
                self.lengths[length] -= 1
                if not self.lengths[length]:
                    del self.lengths[length]
            return result

    def next_element(self, position: int) -> tuple[int, bytes, int] | None:
        return BpfMap.next_element(self, position)  # the kernel cannot walk a trie either
