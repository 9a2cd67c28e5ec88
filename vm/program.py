"""`Program`: a loaded, verified eBPF module, immutable and content-addressed.

The loader builds a Program, the verifier checks it, engines run it. A Program
holds no execution state: every run gets fresh memory from its images.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bpfexec.vm.errors import RequestError
from bpfexec.vm.isa import Instruction


@dataclass(frozen=True)
class Function:
    """A function of the program: `size` instruction slots starting at `pc`."""

    name: str
    pc: int
    size: int
    exported: bool = True  # a global symbol: an entry point clients may call
    # The ELF section it came from (`SEC("xdp")`), which names it too; not part of
    # what the function is (an assembly listing of it has no sections).
    section: str = field(default="", compare=False)


@dataclass(frozen=True)
class HelperRef:
    """How a call site names its helper: by number (`call 42`), by name (a
    relocation against an undefined symbol `mul`), or both once resolved."""

    number: int | None = None
    name: str | None = None

    def __str__(self) -> str:
        if self.name is not None and self.number is not None:
            return f"{self.name} (#{self.number})"
        if self.name is not None:
            return self.name
        return f"#{self.number}"


def content_id(code: bytes) -> str:
    return "sha256:" + hashlib.sha256(code).hexdigest()


@dataclass(frozen=True, eq=False)
class Program:
    instructions: tuple[Instruction, ...]
    functions: tuple[Function, ...]  # sorted by pc, covering every instruction
    rodata: bytes = b""  # image of the read-only data region
    data: bytes = b""  # initial image of the writable globals region (.data*, .bss*)
    helper_calls: Mapping[int, HelperRef] = field(default_factory=dict)  # pc -> helper
    lines: Mapping[int, str] = field(default_factory=dict)  # pc -> "file:line"
    # BPF maps it declares (`bpfexec.vm.maps`), in handle order; and whether its
    # numbered helpers are the kernel's (`bpfexec.vm.linux_helpers`).
    maps: tuple[Any, ...] = ()
    # Initial elements of program arrays and maps of maps, (map, index, id), from
    # libbpf's declarative `values = { [i] = &x }` (`bpfexec.vm.callbacks`).
    map_init: tuple[tuple[int, int, int], ...] = ()
    kernel_helpers: bool = False
    # Entry pc -> why a tail call may not enter that function (a packet program's
    # program array holds only programs of its type that its verifier accepts).
    tail_refusals: Mapping[int, str] = field(default_factory=dict)
    name: str = "<program>"  # where it came from, for messages
    id: str = ""  # content hash of the bytes it was loaded from
    # Engine artifacts derived from the program (pre-decoded blocks, native code),
    # built once on first use and kept with it in the module cache.
    compiled: dict[str, Any] = field(default_factory=dict, repr=False)

    def function(self, name: str | None = None) -> Function:
        """The named function, or the first exported one when name is None."""
        if name is None:
            for fn in self.functions:
                if fn.exported:
                    return fn
            if self.functions:
                return self.functions[0]
        for fn in self.functions:
            if fn.name == name:
                return fn
        for fn in self.functions:  # a libbpf-style program is also named by its section
            if fn.section == name and fn.exported:
                return fn
        available = ", ".join(fn.name for fn in self.functions if fn.exported) or "none"
        raise RequestError(f"no function {name!r} in {self.name} (available: {available})")

    def function_at(self, pc: int) -> Function | None:
        starts = [fn.pc for fn in self.functions]
        i = bisect.bisect_right(starts, pc) - 1
        if i >= 0 and pc < self.functions[i].pc + self.functions[i].size:
            return self.functions[i]
        return None

    def location(self, pc: int) -> str:
        """`file:line` of pc when the object carried line info, else ''."""
        return self.lines.get(pc, "")

    @property
    def helpers(self) -> tuple[HelperRef, ...]:
        """The distinct helpers the program calls, in order of first call site."""
        return tuple(dict.fromkeys(self.helper_calls[pc] for pc in sorted(self.helper_calls)))
