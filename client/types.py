"""The client's value types: what the server describes and what an execution returns.

Plain frozen dataclasses built from the protobuf messages, so callers never
handle generated code. They mirror `proto/bpfexec/v1/executor.proto`, where
every field is documented.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator, Mapping, Sequence
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

    def to_dict(self) -> dict[str, object]:
        """The JSON shape of a trap in the command line's output (as a local run's)."""
        return {
            "kind": self.kind,
            "pc": self.pc,
            "instruction": self.instruction,
            "function": self.function,
            "location": self.location,
            "message": self.message,
        }

    def __str__(self) -> str:
        text = f"{self.kind}: {self.message} at pc {self.pc}"
        if self.instruction:
            text += f" ({self.instruction})"
        if self.function:
            text += f" in {self.function}"
        return f"{text}, {self.location}" if self.location else text


@dataclass(frozen=True)
class MapDump:
    """A map and its entries, as (key, value) byte pairs (arrays: non-zero elements)."""

    type: str  # hash, array, lru_hash, percpu_hash, percpu_array
    key_size: int
    value_size: int
    max_entries: int
    entries: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def from_pb(cls, message: pb.MapDump) -> MapDump:
        return cls(
            type=message.type,
            key_size=message.key_size,
            value_size=message.value_size,
            max_entries=message.max_entries,
            entries=tuple((entry.key, entry.value) for entry in message.entries),
        )

    def to_dict(self) -> dict[str, object]:
        """The `--dump-maps` JSON shape of a map (keys and values in hex)."""
        return {
            "type": self.type,
            "key_size": self.key_size,
            "value_size": self.value_size,
            "max_entries": self.max_entries,
            "entries": [{"key": key.hex(), "value": value.hex()} for key, value in self.entries],
        }


@dataclass(frozen=True)
class Event:
    """A record the program submitted to a ring buffer: the map's name and the bytes."""

    map: str
    data: bytes


@dataclass(frozen=True)
class State:
    """A named state on the server: the maps one module's executions share under a name.

    `maps` holds contents only when read with `get_state`; `list_states` leaves it empty.
    """

    name: str
    module_id: str
    map_bytes: int
    map_names: tuple[str, ...]
    maps: Mapping[str, MapDump] = field(default_factory=dict)

    @classmethod
    def from_pb(cls, message: pb.State, maps: Mapping[str, pb.MapDump] | None = None) -> State:
        return cls(
            name=message.name,
            module_id=message.module_id,
            map_bytes=message.map_bytes,
            map_names=tuple(message.maps),
            maps=ordered_maps(maps or {}, message.maps),
        )


@dataclass(frozen=True)
class Result:
    """What an execution did: r0, fuel used, the trap if any, log lines, final buffers;
    the maps after the run if they were asked for (`dump_maps=True`), and the ring
    buffer records if the program has a ring buffer (else None)."""

    return_value: int
    fuel_used: int
    trap: Trap | None
    log: tuple[str, ...]
    buffers: tuple[bytes, ...]
    duration_ns: int = 0
    maps: Mapping[str, MapDump] | None = None
    events: tuple[Event, ...] | None = None

    @classmethod
    def from_pb(
        cls,
        message: pb.ExecuteResponse,
        *,
        dump_maps: bool = False,
        streamed: Sequence[Event] = (),
    ) -> Result:
        """`dump_maps`: the request asked for the maps; `streamed`: the events an
        ExecuteStream sent before its result (which then does not repeat them)."""
        events = tuple(streamed) + tuple(Event(e.map, e.data) for e in message.events)
        return cls(
            return_value=message.return_value,
            fuel_used=message.fuel_used,
            trap=Trap.from_pb(message.trap) if message.trap.kind else None,
            log=tuple(message.log),
            buffers=tuple(message.buffers),
            duration_ns=message.duration_ns,
            maps=ordered_maps(message.maps, ()) if dump_maps else None,
            events=events if events or message.ring_buffer else None,
        )

    @classmethod
    def from_batch_pb(cls, message: pb.BatchResult) -> Result:
        """One result of an ExecuteBatch (no maps, events or duration)."""
        return cls(
            return_value=message.return_value,
            fuel_used=message.fuel_used,
            trap=Trap.from_pb(message.trap) if message.trap.kind else None,
            log=tuple(message.log),
            buffers=tuple(message.buffers),
        )

    @classmethod
    def from_packed_pb(cls, message: pb.PackedResults) -> Iterator[Result]:
        """The results of a PackedResults (packed inputs' results: no buffers)."""
        words = array("Q")
        words.frombytes(message.words)
        if sys.byteorder != "little":
            words.byteswap()
        traps = [Trap.from_pb(trap) for trap in message.traps]
        logs = {log.index: tuple(log.lines) for log in message.logs}
        for index in range(len(words) // 3):
            value, used, trap = words[3 * index], words[3 * index + 1], words[3 * index + 2]
            yield cls(value, used, traps[trap - 1] if trap else None, logs.get(index, ()), ())

    def to_dict(self) -> dict[str, object]:
        """The JSON shape of `bpfexec run` (buffers in hex), the same for local and remote runs."""
        shown: dict[str, object] = {
            "return_value": None if self.trap else self.return_value,  # a trap returns nothing
            "fuel_used": self.fuel_used,
            "trap": None if self.trap is None else self.trap.to_dict(),
            "log": list(self.log),
            "buffers": [buf.hex() for buf in self.buffers],
            "duration_ns": self.duration_ns,
        }  # fmt: skip
        if self.events is not None:
            shown["events"] = [{"map": e.map, "data": e.data.hex()} for e in self.events]
        if self.maps is not None:
            shown["maps"] = {name: dump.to_dict() for name, dump in self.maps.items()}
        return shown


@dataclass(frozen=True)
class PacketResult:
    """What one packet's run of a test run did (`Client.test_run`; docs/test-run.md):
    r0 and its verdict by the kernel's names ("TRAP" for a trapped run), the packet
    after the run (`data`), the context fields the program type may write (`context`:
    name -> int, or a list of ints for `cb`, in the context's order), fuel, duration,
    the trap, the log, and `redirect` = (ifindex, ingress) if bpf_redirect was called."""

    retval: int
    verdict: str
    data: bytes
    context: Mapping[str, int | list[int]]
    fuel_used: int
    duration_ns: int
    trap: Trap | None = None
    log: tuple[str, ...] = ()
    redirect: tuple[int, bool] | None = None

    @classmethod
    def from_pb(cls, message: pb.PacketResult) -> PacketResult:
        context: dict[str, int | list[int]] = {}
        for found in message.context:
            if found.WhichOneof("value") == "array":
                context[found.name] = list(found.array.elements)
            else:
                context[found.name] = found.scalar
        return cls(
            retval=message.retval,
            verdict=message.verdict,
            data=message.data,
            context=context,
            fuel_used=message.fuel_used,
            duration_ns=message.duration_ns,
            trap=Trap.from_pb(message.trap) if message.trap.kind else None,
            log=tuple(message.log),
            redirect=(message.redirect.ifindex, message.redirect.ingress)
            if message.HasField("redirect")
            else None,
        )

    def to_dict(self) -> dict[str, object]:
        """The JSON shape of `bpfexec test-run --per-packet`'s results, the same for local
        and remote runs: `retval` (None when trapped), `verdict`, `ctx_out`, `len` (of
        the packet after the run), `fuel_used`; `trap`, `redirect`, `log` when there are."""
        shown: dict[str, object] = {
            "retval": None if self.trap else self.retval,
            "verdict": self.verdict,
            "ctx_out": {
                name: list(value) if isinstance(value, list) else value
                for name, value in self.context.items()
            },
            "len": len(self.data),
            "fuel_used": self.fuel_used,
        }
        if self.trap is not None:
            shown["trap"] = self.trap.to_dict()
        if self.redirect is not None:
            shown["redirect"] = {"ifindex": self.redirect[0], "ingress": self.redirect[1]}
        if self.log:
            shown["log"] = list(self.log)
        return shown


def ordered_maps(maps: Mapping[str, pb.MapDump], order: Sequence[str]) -> dict[str, MapDump]:
    """Maps by name in `order` (the program's, when known), the rest by name: a
    protobuf map field has no order of its own."""
    names = [name for name in order if name in maps]
    names += sorted(name for name in maps if name not in names)
    return {name: MapDump.from_pb(maps[name]) for name in names}
