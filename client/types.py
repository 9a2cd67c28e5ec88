"""The client's value types: what the server describes and what an execution returns.

Plain frozen dataclasses built from the protobuf messages, so callers never
handle generated code. They mirror `proto/bpfexec/v1/executor.proto`, where
every field is documented.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bpfexec._pb.bpfexec.v1 import executor_pb2 as pb


@dataclass(frozen=True)
class Function:
    """A function of a module: `size` instruction slots from `pc`; `exported` ones are callable."""

    name: str
    pc: int
    size: int
    exported: bool

    @classmethod
    def from_pb(cls, message: pb.Function) -> Function:
        return cls(message.name, message.pc, message.size, message.exported)


@dataclass(frozen=True)
class Helper:
    """A helper known by number, name, or both; `in_process` if the server answers it."""

    number: int | None
    name: str | None
    in_process: bool = True
    description: str = ""
    cost: int = 0

    @classmethod
    def from_pb(cls, message: pb.Helper) -> Helper:
        return cls(
            number=message.number if message.has_number else None,
            name=message.name or None,
            in_process=message.in_process,
            description=message.description,
            cost=message.cost,
        )

    def __str__(self) -> str:
        if self.name is not None and self.number is not None:
            return f"{self.name} (#{self.number})"
        return self.name if self.name is not None else f"#{self.number}"


@dataclass(frozen=True)
class Module:
    """A module cached on the server.

    A Module returned by `Client.load` keeps the uploaded bytes (`code`), so the
    client can upload it again if the server evicted it; one returned by
    `get_module` or `list_modules` has `code == b""`.
    """

    id: str
    name: str
    size: int
    instruction_count: int
    functions: tuple[Function, ...]
    helpers: tuple[Helper, ...]
    code: bytes = field(default=b"", repr=False, compare=False)

    @classmethod
    def from_pb(cls, message: pb.Module, code: bytes = b"") -> Module:
        return cls(
            id=message.id,
            name=message.name,
            size=message.size,
            instruction_count=message.instruction_count,
            functions=tuple(Function.from_pb(fn) for fn in message.functions),
            helpers=tuple(Helper.from_pb(helper) for helper in message.helpers),
            code=code,
        )


@dataclass(frozen=True)
class Trap:
    """Why a program stopped abnormally, and where."""

    kind: str  # OUT_OF_FUEL, MEMORY_FAULT, CALL_DEPTH_EXCEEDED, HELPER_ERROR, ...
    pc: int
    instruction: str
    function: str
    location: str  # "file:line" when the module has debug info, else ""
    message: str

    @classmethod
    def from_pb(cls, message: pb.Trap) -> Trap:
        return cls(
            kind=message.kind,
            pc=message.pc,
            instruction=message.instruction,
            function=message.function,
            location=message.location,
            message=message.message,
        )

    def __str__(self) -> str:
        text = f"{self.kind}: {self.message} at pc {self.pc}"
        if self.instruction:
            text += f" ({self.instruction})"
        if self.function:
            text += f" in {self.function}"
        return f"{text}, {self.location}" if self.location else text


@dataclass(frozen=True)
class Result:
    """What an execution did: r0, fuel used, the trap if any, log lines, final buffers."""

    return_value: int
    fuel_used: int
    trap: Trap | None
    log: tuple[str, ...]
    buffers: tuple[bytes, ...]
    duration_ns: int = 0

    @classmethod
    def from_pb(cls, message: pb.ExecuteResponse) -> Result:
        return cls(
            return_value=message.return_value,
            fuel_used=message.fuel_used,
            trap=Trap.from_pb(message.trap) if message.trap.kind else None,
            log=tuple(message.log),
            buffers=tuple(message.buffers),
            duration_ns=message.duration_ns,
        )

    def to_dict(self) -> dict[str, object]:
        """The JSON shape of `bpfexec run` (buffers in hex), the same for local and remote runs."""
        return {
            "return_value": None if self.trap else self.return_value,  # a trap returns nothing
            "fuel_used": self.fuel_used,
            "trap": None if self.trap is None else {
                "kind": self.trap.kind,
                "pc": self.trap.pc,
                "instruction": self.trap.instruction,
                "function": self.trap.function,
                "location": self.trap.location,
                "message": self.trap.message,
            },
            "log": list(self.log),
            "buffers": [buf.hex() for buf in self.buffers],
            "duration_ns": self.duration_ns,
        }  # fmt: skip
