"""`Limits`: every bound the VM enforces, in one frozen value.

The CLI, the server settings and the tests all build their limits from this
class; no other module hard-codes a bound. Each field's `help` is the text of
its `bpfexec serve` flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from bpfexec.vm.errors import LimitError
from bpfexec.vm.memory import MAX_BUFFERS


def _limit(default: int, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Limits:
    default_fuel: int = _limit(10_000_000, "fuel (instructions) of a run that asks for none")
    max_fuel: int = _limit(10_000_000_000, "largest fuel budget a run may ask for")
    max_call_depth: int = _limit(64, "frames on the call stack, the entry function's included")
    stack_frame_size: int = _limit(512, "bytes of stack per frame")
    max_module_bytes: int = _limit(16 << 20, "largest module accepted, in bytes")
    max_instructions: int = _limit(1 << 20, "instruction slots per module")
    max_buffers: int = _limit(MAX_BUFFERS, f"argument buffers per run (at most {MAX_BUFFERS})")
    max_buffer_bytes: int = _limit(16 << 20, "bytes per argument buffer")
    max_log_lines: int = _limit(1000, "log lines kept per run (later ones are dropped)")
    max_log_bytes: int = _limit(64 << 10, "log bytes kept per run (later lines are dropped)")
    max_helper_calls: int = _limit(1_000_000, "helper calls per run (beyond: HELPER_ERROR)")
    max_map_bytes: int = _limit(64 << 20, "bytes of BPF map values a module may declare")

    def __post_init__(self) -> None:
        for knob in fields(self):
            if getattr(self, knob.name) < 0:
                raise ValueError(
                    f"{knob.name} must not be negative, got {getattr(self, knob.name)}"
                )
        for name in ("max_fuel", "max_call_depth", "stack_frame_size", "max_module_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_buffers > MAX_BUFFERS:
            raise ValueError(f"max_buffers is at most {MAX_BUFFERS}, got {self.max_buffers}")
        if self.stack_frame_size % 8:
            raise ValueError(
                f"stack_frame_size must be a multiple of 8, got {self.stack_frame_size}"
            )

    @property
    def stack_size(self) -> int:
        return self.max_call_depth * self.stack_frame_size

    def fuel(self, requested: int | None) -> int:
        """The budget for a run: the default when none is asked; above max_fuel is an error."""
        if not requested:
            return self.default_fuel
        if requested > self.max_fuel:
            raise LimitError(f"fuel {requested} exceeds the maximum of {self.max_fuel}")
        return requested
