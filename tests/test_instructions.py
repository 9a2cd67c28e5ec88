"""Table-driven instruction tests: every file in `tests/data/` is one case.

A case file, in the style of uBPF's test files:

    # what the case shows (comment lines before the first section)
    -- asm
        r0 = 7
        exit
    -- mem        (optional) hex bytes: an argument buffer, r1 = its address, r2 = its length
    -- args       (optional) more integer arguments, one per line, after the buffer if any
    -- result     expected r0, hex
    -- error      or: the expected trap kind (MEMORY_FAULT, OUT_OF_FUEL, ...)
    -- fuel       (optional) expected fuel_used: the number of instructions executed

The cases hold every engine to RFC 9669: each file runs on each engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from bpfexec import vm
from bpfexec.vm.loader import load

DATA = Path(__file__).parent / "data"
BUDGET = 100_000  # far above what any case needs; the infinite loop case stops here


@dataclass(frozen=True)
class Case:
    asm: str
    mem: bytes | None = None
    args: tuple[int, ...] = ()
    result: int | None = None
    error: str | None = None
    fuel: int | None = None

    @property
    def arguments(self) -> list[int | bytes]:
        prefix: list[int | bytes] = [self.mem, len(self.mem)] if self.mem is not None else []
        return [*prefix, *self.args]


def parse_case(text: str, name: str) -> Case:
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("-- "):
            current = sections.setdefault(line[3:].strip(), [])
        elif current is not None:
            current.append(line)
        elif line.strip() and not line.startswith("#"):
            raise ValueError(f"{name}: text before the first section: {line!r}")
    unknown = set(sections) - {"asm", "mem", "args", "result", "error", "fuel"}
    if unknown or "asm" not in sections or ("result" in sections) == ("error" in sections):
        raise ValueError(f"{name}: needs -- asm and one of -- result / -- error (got {sections})")

    def single(key: str) -> str | None:
        lines = [line.strip() for line in sections.get(key, []) if line.strip()]
        return lines[0] if lines else None

    mem = sections.get("mem")
    result, fuel = single("result"), single("fuel")
    return Case(
        asm="\n".join(sections["asm"]) + "\n",
        mem=bytes.fromhex(" ".join(mem)) if mem is not None else None,
        args=tuple(int(line, 0) for line in sections.get("args", []) if line.strip()),
        result=int(result, 16) if result is not None else None,
        error=single("error"),
        fuel=int(fuel) if fuel is not None else None,
    )


CASE_FILES = sorted(DATA.glob("*.data"))


def test_there_are_cases() -> None:
    assert len(CASE_FILES) > 100


@pytest.mark.parametrize("path", CASE_FILES, ids=[p.stem for p in CASE_FILES])
def test_instruction(path: Path, engine: str) -> None:
    case = parse_case(path.read_text(), path.name)
    program = load(case.asm.encode(), name=path.name)
    result = vm.execute(program, None, case.arguments, fuel=BUDGET, engine=engine)
    if case.error is not None:
        assert result.trap is not None, f"expected {case.error}, got r0 = {result.return_value:#x}"
        assert result.trap.kind.value == case.error, str(result.trap)
    else:
        assert result.trap is None, str(result.trap)
        assert result.return_value == case.result, (
            f"r0 = {result.return_value:#x}, expected {case.result:#x}"
        )
    if case.fuel is not None:
        assert result.fuel_used == case.fuel
