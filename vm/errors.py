"""The VM's errors: one hierarchy, rooted in `VmError`.

- `LoadError`: the bytes are not a program we can load (bad ELF, unsupported
  section or relocation, bad assembly). `VerifyError` is the subclass for
  programs that decode but break a static rule; it names the pc.
- `LinkError`: a helper the program calls is not available.
- `Trap`: the program stopped abnormally while running. A trap is an outcome of
  the program, reported in its `Result`, not a failure of the request.

Every message says what went wrong and where, in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class VmError(Exception):
    """Base of every error the vm package raises on purpose."""


class LoadError(VmError):
    """The input cannot be loaded; the message names the problem and where."""


class VerifyError(LoadError):
    """A static rule is broken at `pc`; `instruction` is its disassembly."""

    def __init__(self, message: str, pc: int, instruction: str = "", location: str = "") -> None:
        self.pc = pc
        self.instruction = instruction
        self.location = location
        where = f"pc {pc}"
        if instruction:
            where += f" ({instruction})"
        if location:
            where += f" at {location}"
        super().__init__(f"{where}: {message}")
        self.reason = message


@dataclass(frozen=True)
class HelperSite:
    """A call site of a helper that could not be resolved."""

    pc: int
    function: str
    location: str = ""

    def __str__(self) -> str:
        text = f"pc {self.pc} in {self.function}"
        return f"{text} ({self.location})" if self.location else text


class RequestError(VmError):
    """The execution request is wrong: unknown function, bad arguments."""


class LimitError(RequestError):
    """The request exceeds a configured limit (fuel, buffer size, module size...)."""


class LinkError(VmError):
    """Helpers the program calls are not available; `missing` maps each one to its call sites."""

    def __init__(self, missing: dict[str, list[HelperSite]]) -> None:
        self.missing = missing
        parts = [
            f"{helper} (called at {', '.join(str(site) for site in sites)})"
            for helper, sites in missing.items()
        ]
        super().__init__("unknown helper: " + "; unknown helper: ".join(parts))


class TrapKind(str, Enum):
    OUT_OF_FUEL = "OUT_OF_FUEL"
    MEMORY_FAULT = "MEMORY_FAULT"
    CALL_DEPTH_EXCEEDED = "CALL_DEPTH_EXCEEDED"
    HELPER_ERROR = "HELPER_ERROR"
    UNKNOWN_HELPER = "UNKNOWN_HELPER"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"

    @property
    def code(self) -> int:
        """The kind as a small number (never 0, which packed results use for no trap)."""
        return list(TrapKind).index(self) + 1

    @classmethod
    def from_code(cls, code: int) -> TrapKind:
        return list(cls)[code - 1]


class Trap(VmError):
    """The program stopped abnormally.

    Raised with a kind and a message where the fault is detected; the engine
    then fills in where it happened (`pc`, `instruction`, `function`,
    `location`) with `at()`.
    """

    def __init__(
        self,
        kind: TrapKind,
        message: str,
        pc: int = -1,
        instruction: str = "",
        function: str = "",
        location: str = "",
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.pc = pc
        self.instruction = instruction
        self.function = function
        self.location = location

    def at(self, pc: int, instruction: str, function: str, location: str) -> Trap:
        self.pc, self.instruction = pc, instruction
        self.function, self.location = function, location
        return self

    def __str__(self) -> str:
        text = f"{self.kind.value}: {self.message}"
        if self.pc >= 0:
            text += f" at pc {self.pc}"
            if self.instruction:
                text += f" ({self.instruction})"
            if self.function:
                text += f" in {self.function}"
            if self.location:
                text += f", {self.location}"
        return text

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind.value,
            "pc": self.pc,
            "instruction": self.instruction,
            "function": self.function,
            "location": self.location,
            "message": self.message,
        }
