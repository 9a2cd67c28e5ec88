"""`Limits`: every bound the VM enforces, in one frozen value.

The CLI, the server settings and the tests all build their limits from this
class; no other module hard-codes a bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from vm.errors import LimitError
from vm.memory import MAX_BUFFERS


@dataclass(frozen=True)
class Limits:
    default_fuel: int = 10_000_000  # instructions, when a request names none
    max_fuel: int = 10_000_000_000
    max_call_depth: int = 64  # frames, the entry function's included
    stack_frame_size: int = 512  # bytes per frame
    max_module_bytes: int = 16 << 20
    max_instructions: int = 1 << 20  # instruction slots per module
    max_buffers: int = MAX_BUFFERS
    max_buffer_bytes: int = 16 << 20  # per argument buffer
    max_log_lines: int = 1000  # per execution; later lines are dropped
    max_log_bytes: int = 64 << 10
    max_helper_calls: int = 1_000_000  # per execution

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
