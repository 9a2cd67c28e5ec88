"""Queues and stacks (`queue`, `stack`), as the kernel's kernel/bpf/queue_stack_maps.c.

They have no keys (key_size 0) and give a program no pointer into them: values
go in and out by copy, through `bpf_map_push_elem`, `bpf_map_pop_elem` and
`bpf_map_peek_elem`, so they live in Python (a deque) and the map's region is
empty. A queue pops its oldest value, a stack its newest. Pushing onto a full
one is -E2BIG, unless the flags are BPF_EXIST: then the oldest value is
dropped to make room, for a stack too.

As in the kernel, `update` (userspace's BPF_MAP_UPDATE_ELEM, and here
`bpf_map_update_elem` too) pushes, a lookup finds nothing, delete is -EINVAL.
The dump lists the values in pop order, with empty keys.
"""

from __future__ import annotations

from collections import deque

from bpfexec.vm.maps_base import (
    BPF_EXIST,
    BPF_NOEXIST,
    E2BIG,
    EINVAL,
    BpfMap,
    MapDefinition,
    MapType,
)


class QueueMap(BpfMap):
    def __init__(self, spec: MapDefinition, index: int, kind: MapType) -> None:
        super().__init__(spec, index, kind)
        self.stack = kind.name == "stack"
        self.items: deque[bytes] = deque()  # oldest first

    @classmethod
    def problem(cls, spec: MapDefinition, name: str) -> str | None:
        if spec.key_size != 0:
            return f"a {name}'s key_size must be 0"
        if spec.value_size <= 0:
            return "value_size must be positive"
        return None

    @classmethod
    def region_bytes(cls, spec: MapDefinition) -> int:
        return 0

    @classmethod
    def memory(cls, spec: MapDefinition) -> int:
        return spec.value_size * spec.max_entries

    def push(self, value: bytes, flags: int) -> int:
        """0, or -E2BIG when full (without BPF_EXIST), -EINVAL for bad flags."""
        if flags & BPF_NOEXIST or flags > BPF_EXIST:
            return -EINVAL
        with self.lock:
            if len(self.items) >= self.spec.max_entries:
                if not flags & BPF_EXIST:
                    return -E2BIG
                self.items.popleft()
            self.items.append(bytes(value[: self.spec.value_size]))
            return 0

    def pop(self) -> bytes | None:
        """The value taken out (the oldest of a queue, the newest of a stack), or None."""
        with self.lock:
            if not self.items:
                return None
            return self.items.pop() if self.stack else self.items.popleft()

    def peek(self) -> bytes | None:
        """The value `pop` would take, left in place, or None."""
        with self.lock:
            if not self.items:
                return None
            return self.items[-1] if self.stack else self.items[0]

    def update(self, key: bytes, value: bytes, flags: int) -> int:
        return self.push(value, flags)

    def entries(self) -> list[tuple[bytes, bytes]]:
        with self.lock:
            order = reversed(self.items) if self.stack else iter(self.items)
            return [(b"", value) for value in order]
