"""Turn uploaded bytes into a verified `Program`: the one entry point for loading.

The input is recognised by its content: an ELF object (`bpfexec.vm.elf`), assembly
text (`bpfexec.vm.assembler`), or raw bytecode (little-endian 8-byte slots). Size
limits are enforced before any parsing, and every program is verified before
it is returned, so a caller never holds an unchecked `Program`.

What it must not do: parse ELF or assembly itself, or run anything.
"""

from __future__ import annotations

import re
from dataclasses import replace

from bpfexec.vm import isa
from bpfexec.vm.errors import LimitError, LoadError
from bpfexec.vm.limits import Limits
from bpfexec.vm.program import Function, HelperRef, Program, content_id
from bpfexec.vm.verifier import verify

ELF_MAGIC = b"\x7fELF"


def load(data: bytes, name: str = "<module>", limits: Limits | None = None) -> Program:
    """Load and verify a module; raises `LoadError` (or `VerifyError`) or `LimitError`."""
    limits = limits or Limits()
    name = printable(name)  # it starts most messages, which must stay on one line
    if len(data) > limits.max_module_bytes:
        raise LimitError(
            f"{name}: module of {len(data)} bytes exceeds the limit of "
            f"{limits.max_module_bytes} bytes"
        )
    if not data:
        raise LoadError(f"{name}: empty module (no bytes to load)")
    if data[:4] == ELF_MAGIC:
        from bpfexec.vm.elf import load_elf  # pyelftools is only imported for ELF input

        program = load_elf(data, name, limits)
    else:
        text = _assembly_text(data)
        program = _assemble(text, name) if text is not None else _raw(data, name)
    if len(program.instructions) > limits.max_instructions:
        raise LimitError(
            f"{name}: {len(program.instructions)} instructions exceed the limit of "
            f"{limits.max_instructions}"
        )
    program = replace(program, name=name, id=content_id(data))
    verify(program)
    return program


def printable(text: str) -> str:
    """`text` with its unprintable characters (line breaks, controls) escaped."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _assembly_text(data: bytes) -> str | None:
    """The text, if the bytes read as assembly rather than bytecode.

    Real bytecode is full of NUL bytes (every `exit` has seven), text never
    has one, so that decides; the rest only rules out binary noise.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\0" in text or not text.strip():
        return None
    if not all(ch.isprintable() or ch in "\t\n\r\f\v" for ch in text):
        return None
    return text


def _assemble(text: str, name: str) -> Program:
    from bpfexec.vm.assembler import assemble

    try:
        module = assemble(text, name)
    except LoadError:
        if _C_SOURCE.search(text) or name.endswith((".c", ".h")):
            raise LoadError(
                f"{name}: C source, not an eBPF object or assembly: compile it first "
                f"(clang -O2 -target bpf -c {name})"
            ) from None
        raise
    return Program(
        instructions=tuple(module.instructions),
        functions=tuple(module.functions),
        helper_calls=dict(module.helper_calls),
        name=name,
    )


# What C has and eBPF assembly never does: preprocessor lines, braces.
_C_SOURCE = re.compile(r"^\s*#\s*(include|define|if|pragma)\b|[{}]", re.MULTILINE)


def _raw(data: bytes, name: str) -> Program:
    if len(data) % isa.INSTRUCTION_SIZE:
        raise LoadError(
            f"{name}: raw bytecode length {len(data)} is not a multiple of {isa.INSTRUCTION_SIZE}"
        )
    code = isa.decode(data)
    # Without symbols, the only function boundaries we know are call targets.
    starts = {0: "main"}
    helper_calls: dict[int, HelperRef] = {}
    pc = 0
    while pc < len(code):
        insn = code[pc]
        if insn.opcode == isa.OP_CALL and insn.src == isa.CALL_LOCAL:
            target = pc + 1 + insn.imm
            if 0 < target < len(code):
                starts.setdefault(target, f"fn_{target}")
        elif isa.is_helper_call(insn):
            helper_calls[pc] = HelperRef(number=insn.imm & isa.MASK32)
        pc += 2 if insn.opcode == isa.LDDW else 1
    ordered = sorted(starts)
    functions = tuple(
        Function(starts[start], start, end - start, exported=start == 0)
        for start, end in zip(ordered, [*ordered[1:], len(code)], strict=True)
    )
    return Program(code, functions, helper_calls=helper_calls, name=name)
