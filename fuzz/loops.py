"""Programs that attack the checks the optimized JIT tier elides, and their comparison.

docs/jit.md ("Where a check is elided, and why that is sound") lists what native
code does not check: fuel and polls inside unrolled groups, strided accesses
after a group's precheck, region lookups on a guessed region, loads from
forwarded frame slots, re-translations of parameters never written, accesses at
constant frame offsets. Each rests on a condition of the control-flow graph or of
the values a run computes. Random instruction soup rarely meets the shapes that
turn these optimizations on (an innermost loop with a single latch, a pointer
stepped by an invariant register, a spilled pointer reloaded after a call), so
`generate` builds them on purpose, from a stream of choices:

- **Loop nests** of up to three shapes: a loop entered from above; a rotated
  loop whose head is also entered by backward jumps from an outer latch
  *outside* its body (no round has run with the registers that latch hands
  it); an outer loop around an inner one; and entries into the middle of a
  body (a forward jump from before the loop, a backward one from after it).
- **Strided accesses**: loads, stores, atomics through a pointer stepped each
  round by an invariant register or a constant (up, down, twice per round),
  through a counter scaled and added to the buffer or to r10 (a stack array:
  r10 plus an index register), through a second pointer that aliases the first
  or a frame slot, with steps chosen so that `k * step` wraps around 2^64 for
  some k in 1..8 (`wrapping_step`), negative, at and past 2^32, and counts that
  walk off the buffer in the middle of a group.
- **Frame slots**: the arguments and pointers are spilled to the stack at
  constant offsets and reloaded; stores through a copied r10 overwrite them;
  local calls (`call fn`, which writes through a pointer to the caller's frame)
  and helper calls (`memcpy`, `memset`) sit between a spill and its reload.
- **Region guesses**: pointers stored in the buffer or the frame (into the
  buffer, the stack, an unmapped region, past the end) are loaded back and
  dereferenced, inside and outside loops.
- **Hoisted parameters**: the buffer pointer r1 is often never written, so its
  translation is hoisted into the prologue; callees walk their own parameter.

Every program takes `r1` = a buffer, `r2` = its length and `r3..r5` =
adversarial integers (steps, offsets, counts, raw pointers), which is exactly
what a `tests/data/*.data` case can express (`-- mem`, `-- args`); `case_file`
writes one. `check` runs a case on the interpreter and on both JIT tiers and
raises `Finding` on any difference in r0, fuel used, trap (kind, pc, message),
log or final buffer, or on a compiler fault (the JIT's fallback for a bug of
its own). A wrong elision may also end the process with a crash:
`fuzz/isolated.py` runs cases in a child process for that reason.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bpfexec import vm
from bpfexec.vm.builtin_helpers import standard_helpers
from bpfexec.vm.errors import LoadError
from bpfexec.vm.isa import MASK64
from bpfexec.vm.memory import STACK_BASE, buffer_base
from bpfexec.vm.program import Program

try:  # how many rounds a group unrolls, to aim wrapping steps at it
    from bpfexec.vm.jit.unroll import GROUP_INSTRUCTIONS, MAX_COPIES
except ImportError:  # no llvmlite: the values when this was written
    GROUP_INSTRUCTIONS, MAX_COPIES = 64, 8

from fuzz.targets import Finding

BUDGET = 100_000  # the fuel `tests/test_instructions.py` runs a .data case with
MEMCPY, MEMSET = 0x10000, 0x10002  # standard helpers (bpfexec.vm.builtin_helpers)


# -- the choice stream ------------------------------------------------------------------


class Choices:
    """Decisions read from bytes: the same bytes make the same program.

    Past the end of the data every decision is 0, the simplest option, so a
    short input is a small program (and atheris mutates bytes into decisions).
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def below(self, n: int) -> int:
        """An integer in [0, n)."""
        if n <= 1:
            return 0
        size = (n - 1).bit_length() + 7 >> 3
        raw = self.data[self.at : self.at + size]
        self.at += size
        return int.from_bytes(raw, "little") % n

    def between(self, low: int, high: int) -> int:
        return low + self.below(high - low + 1)

    def chance(self, percent: int) -> bool:
        return self.below(100) < percent

    def pick(self, options: Sequence[Any]) -> Any:
        return options[self.below(len(options))]

    def u64(self) -> int:
        return self.below(1 << 64)


# -- adversarial values -------------------------------------------------------------------


def wrapping_step(k: int, target: int, twist: int = 0) -> int:
    """A step s with `k * s == target (mod 2^64)`: s itself is huge, but k rounds of
    it land `target` bytes further. k = 2^a * m (m odd) needs 2^a to divide target;
    `twist` picks among the 2^a solutions."""
    a = (k & -k).bit_length() - 1
    m = k >> a
    target &= MASK64
    if target % (1 << a):
        target -= target % (1 << a)
    base = (target >> a) * pow(m, -1, 1 << 64) & MASK64
    return (base + twist * (1 << (64 - a))) & MASK64 if a else base


def draw_step(c: Choices, length: int, aims: Sequence[int] = (), hostile: bool = False) -> int:
    """A pointer step: ordinary, negative, at 2^32, or one whose multiples wrap: `k *
    step` lands a few bytes away, for k one of `aims` (the rounds a group of a loop
    of the program spans, from its first round to its last) or any k up to 8.
    `hostile`: mostly the last kind."""
    kind = c.pick([2, 2, 2, 2, 2, 2, 2, 0, 5, 6]) if hostile else c.below(8)
    if kind <= 1:
        return c.pick([1, 2, 3, 4, 7, 8, 16, 0, -1, -2, -4, -8, length, -length]) & MASK64
    if kind <= 4:  # k * step lands a few bytes away: mostly inside the buffer
        k = c.pick(aims) if aims and c.chance(85) else c.between(1, 8)
        inside = [1, 2, 3, 4, 8, 16, 0, -1, -8]
        target = c.pick(inside if c.chance(80) else [length, length - 1, 64, -64, 1 << 32])
        return wrapping_step(k, target, c.below(4))
    if kind == 5:
        bound = 1 << 32
        return c.pick([bound, bound - 1, bound + 1, -bound, 1 - bound, 1 << 63, (1 << 63) + 8,
                       (1 << 62) + 1, 1 << 36, 0x7FFFFFFF, 0x80000000]) & MASK64  # fmt: skip
    if kind == 6:
        return c.u64()
    return c.between(-(1 << 12), 1 << 12) & MASK64


def draw_pointer(c: Choices, length: int) -> int:
    """A value used as an address: in or near the buffer, the stack, or nowhere."""
    return c.pick(
        [
            buffer_base(0) + c.below(length + 1),
            buffer_base(0) + length,
            buffer_base(0) - 1,
            buffer_base(1),  # a buffer no run maps
            STACK_BASE + c.below(1 << 16),
            STACK_BASE - 8,
            0,
            1 << 63,
            16 << 32,  # region 16: a 16-entry table would wrap it to region 0
            MASK64 - 7,
            c.u64(),
        ]
    )


def draw_argument(c: Choices, length: int, aims: Sequence[int] = ()) -> int:
    kind = c.below(6)
    if kind <= 2:
        return draw_step(c, length, aims)
    if kind == 3:
        return draw_pointer(c, length)
    if kind == 4:
        return c.pick([0, 1, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, length - 1, length,
                       length + 1, MASK64, 1 << 32]) & MASK64  # fmt: skip
    return c.u64()


# -- cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One program and its inputs: r1 = `buffer`, r2 = its length, r3.. = `args`."""

    asm: str
    buffer: bytes
    args: tuple[int, ...] = ()
    fuels: tuple[int, ...] = (BUDGET,)
    helpers: bool = False  # it calls the standard memory helpers
    shapes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def arguments(self) -> list[int | bytes]:
        return [self.buffer, len(self.buffer), *self.args]

    def to_json(self) -> str:
        return json.dumps(
            {
                "asm": self.asm,
                "buffer": self.buffer.hex(),
                "args": list(self.args),
                "fuels": list(self.fuels),
                "helpers": self.helpers,
                "shapes": list(self.shapes),
            }
        )

    @staticmethod
    def from_json(text: str) -> Case:
        d = json.loads(text)
        return Case(
            d["asm"],
            bytes.fromhex(d["buffer"]),
            tuple(d["args"]),
            tuple(d["fuels"]),
            d["helpers"],
            tuple(d.get("shapes", ())),
        )


class _Program:
    """Assembly text under construction: instructions, labels, instruction count."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.labels = 0

    def label(self, stem: str) -> str:
        self.labels += 1
        return f"{stem}{self.labels}"

    def put(self, *insns: str) -> None:
        self.lines += [f"    {insn}" for insn in insns]

    def at(self, label: str) -> None:
        self.lines.append(f"{label}:")


SIZES = ("u8", "u16", "u32", "u64")
SLOT_STEP, SLOT_OFFSET, SLOT_EXTRA = -8, -16, -24  # where the prologue spills r3, r4, r5
SLOT_SPILL, SLOT_ACC = -40, -48  # a spilled pointer; r0 across a call
FRAME_ARRAY = -128  # start of a 64-byte array in the frame: [r10 - 128, r10 - 64)


class _Generator:
    def __init__(self, data: bytes) -> None:
        self.c = Choices(data)
        self.p = _Program()
        self.shapes: list[str] = []

    # registers: r0 accumulates; the roles below are drawn anew for every program
    def roles(self) -> None:
        c = self.c
        self.calls = c.chance(35)
        self.helpers = self.calls and c.chance(50)
        pool = [3, 4, 5, 6, 7, 8, 9]
        order = []
        while pool:
            order.append(pool.pop(c.below(len(pool))))
        self.S, self.C, self.O, self.Q, self.T, self.P, self.B = order
        if not self.calls:  # r1 is the walker, or the base, never written (hoisted)
            how = c.below(3)
            if how == 0:
                self.P = 1
            elif how == 1:
                self.B = 1
        # the base must survive calls: r6..r9 (or r1 when nothing calls)
        if self.calls and self.B < 6:
            swap = next(r for r in (self.S, self.C, self.O, self.Q, self.T, self.P) if r >= 6)
            names = ["S", "C", "O", "Q", "T", "P"]
            role = names[[getattr(self, n) for n in names].index(swap)]
            setattr(self, role, self.B)
            self.B = swap

    def r(self, n: int) -> str:
        return f"r{n}"

    def generate(self) -> Case:
        c = self.c
        length = c.pick([64, 64, 16, 24, 100, 8, 256])
        buffer = bytes(c.below(256) for _ in range(min(length, 8))) + bytes(
            (i * 37 + 11) & 0xFF for i in range(max(length - 8, 0))
        )
        self.length = length
        self.aims: list[int] = []
        self.walking = False  # the walker P has been set
        self.roles()
        p, r = self.p, self.r
        p.at("main")
        # Spill the arguments: the roles are loaded from these slots (forwarded).
        p.put(f"*(u64 *)(r10 - {-SLOT_STEP}) = r3", f"*(u64 *)(r10 - {-SLOT_OFFSET}) = r4",
              f"*(u64 *)(r10 - {-SLOT_EXTRA}) = r5", "r0 = 0")  # fmt: skip
        if self.B != 1:
            p.put(f"{r(self.B)} = r1")
        if c.chance(75):
            # The first poll site of a run (and the first after a helper call) reads the
            # interrupt flag, so the first backward jump never enters a group: spend it
            # here, so that the first entry of the next loop may be a group.
            self.shapes.append("warm-up")
            warm = p.label("warm")
            p.put(f"r2 = {c.between(1, 3)}")
            p.at(warm)
            p.put("r2 -= 1", f"if r2 != 0 goto {warm}")
        if c.chance(40):
            self.pointer_table()
        for _ in range(c.between(1, 3)):
            if self.calls and c.chance(60):
                self.call_segment()
            self.nest()
        if self.calls and c.chance(50):
            self.call_segment()
        p.put("exit")
        if self.calls:
            self.callees()
        # the arguments last, so that their steps can aim at the loops' groups
        step = draw_step(c, length, self.aims, hostile=True) if c.chance(75) else None
        args = tuple(draw_argument(c, length, self.aims) for _ in range(3 - (step is not None)))
        args = args if step is None else (step, *args)
        fuels = (BUDGET, c.pick([c.between(1, 300), c.between(300, 3000)]))
        return Case(
            "\n".join(p.lines) + "\n",
            buffer,
            args,
            fuels,
            self.helpers,
            tuple(dict.fromkeys(self.shapes)),
        )

    # -- pieces ------------------------------------------------------------------------

    def pointer_table(self) -> None:
        """Pointers stored in the buffer and the frame, for loads through loaded pointers."""
        c, p, r, B, T = self.c, self.p, self.r, self.B, self.T
        self.shapes.append("pointer-table")
        for slot in range(c.between(1, 3)):
            how = c.below(5)
            if how == 0:
                p.put(f"{r(T)} = {r(B)}", f"{r(T)} += {c.below(self.length + 9) - 1}")
            elif how == 1:
                p.put(f"{r(T)} = r10", f"{r(T)} += {c.pick([-8, -16, -40, FRAME_ARRAY, 0, 8])}")
            elif how == 2:
                p.put(f"{r(T)} = *(u64 *)(r10 - {c.pick([16, 24])})")
            elif how == 3:
                p.put(f"{r(T)} = *(u64 *)(r10 - {-SLOT_OFFSET})", f"{r(T)} += {r(B)}")
            else:
                p.put(f"{r(T)} = {draw_pointer(c, self.length):#x} ll")
            if self.length >= 8 * (slot + 1) and c.chance(60):
                p.put(f"*(u64 *)({r(B)} + {8 * slot}) = {r(T)}")
            else:
                p.put(f"*(u64 *)(r10 - {56 + 8 * slot}) = {r(T)}")

    def step_source(self, hostile: bool = False) -> None:
        """Set the step register S: an argument, a constant, or a wrapping constant
        (`hostile`: mostly the argument or a constant aimed at the last loop's groups)."""
        c, p, S = self.c, self.p, self.r(self.S)
        how = c.pick([0, 0, 0, 4, 4, 4, 3, 5]) if hostile else c.below(6)
        if how <= 2:
            p.put(f"{S} = *(u64 *)(r10 - {-SLOT_STEP})")
        elif how == 3:
            p.put(f"{S} = {c.between(-8, 16)}")
        elif how == 4:
            aims = self.aims[-1:] if hostile else self.aims
            p.put(f"{S} = {draw_step(c, self.length, aims, hostile):#x} ll")
        else:  # the argument, changed: still wrapping, truncated to 32 bits, sign-extended
            change = c.pick(
                [
                    f"{S} {c.pick(['+=', '*=', '-='])} {c.between(-3, 9)}",
                    f"w{S[1:]} = w{S[1:]}",
                    f"{S} = (s32){S}",
                    f"{S} = -{S}",
                ]
            )
            p.put(f"{S} = *(u64 *)(r10 - {-SLOT_STEP})", change)

    def alias_source(self) -> None:
        """Set Q: a second pointer into the buffer, the frame, or wherever an argument says."""
        c, p, r, Q, B = self.c, self.p, self.r, self.r(self.Q), self.B
        how = c.below(6)
        if how == 0:
            p.put(f"{Q} = {r(B)}", f"{Q} += {c.below(self.length + 2)}")
        elif how == 1:
            p.put(f"{Q} = *(u64 *)(r10 - {-SLOT_OFFSET})", f"{Q} += {r(B)}")
        elif how == 2:  # the frame slot a pointer is spilled to, or the frame array
            p.put(f"{Q} = r10", f"{Q} += {c.pick([SLOT_SPILL, SLOT_ACC, SLOT_STEP, FRAME_ARRAY])}")
        elif how == 3:
            p.put(f"{Q} = *(u64 *)(r10 - {c.pick([16, 24])})")
        elif how == 4 and self.P != 1:
            p.put(f"{Q} = {r(self.P)}")  # the walker itself, set just before
        else:
            p.put(f"{Q} = *(u64 *)({r(B)} + 0)" if self.length >= 8 else f"{Q} = {r(B)}")

    def walker_source(self) -> None:
        c, p, r, P, B = self.c, self.p, self.r, self.r(self.P), self.B
        self.walking = True
        how = c.pick([0, 0, 0, 0, 2, 3, 4])
        if how <= 1:
            p.put(f"{P} = {r(B)}")
        elif how == 2:
            p.put(f"{P} = {r(B)}", f"{P} += {c.pick([1, 8, self.length - 1, self.length])}")
        elif how == 3:
            p.put(f"{P} = r10", f"{P} += {c.pick([FRAME_ARRAY, -64, -8, SLOT_SPILL])}")
        else:
            p.put(f"{P} = *(u64 *)(r10 - {-SLOT_OFFSET})", f"{P} += {r(B)}")

    def access(self, base: str) -> list[str]:
        """One load (added to r0), store or atomic through `base` at a small offset."""
        c, T = self.c, self.r(self.T)
        size = c.pick(SIZES)
        # mostly in bounds at first, so that a run goes on to the groups after it
        edge = [-1, -8, 63, 64, self.length - 1, self.length, c.between(-16, 72)]
        offset = c.pick(edge) if c.chance(15) else c.between(0, 7)
        sign = "+" if offset >= 0 else "-"
        at = f"*({size} *)({base} {sign} {abs(offset)})"
        kind = c.below(6)
        if kind <= 2:
            target = c.pick([T, "r2"])
            ext = f"*(s{size[1:]} *)" if size != "u64" and c.chance(15) else f"*({size} *)"
            return [f"{target} = {ext}({base} {sign} {abs(offset)})", f"r0 += {target}"]
        if kind <= 4:
            value = c.pick([self.r(self.C), "r0", T, str(c.between(-128, 255))])
            return [f"{at} = {value}"]
        size = c.pick(["u32", "u64"])
        at = f"{base} {sign} {abs(offset)}"
        how = c.below(5)
        if how <= 1:
            op = c.pick(["+=", "|=", "&=", "^="])
            return [f"lock *({size} *)({at}) {op} {self.r(self.C)}"]
        # atomics that write a register: a scratch one, r0, or the base (r1 itself, maybe,
        # which is then a parameter the function writes: its translation is not hoisted)
        reg = self.r(c.pick([self.T, self.T, self.T, self.B]))
        w = reg if size == "u64" else "w" + reg[1:]
        if how == 2:
            op = c.pick(["add", "or", "and", "xor"])
            return [f"{w} = atomic_fetch_{op}(({size} *)({at}), {w})", f"r0 += {reg}"]
        if how == 3:
            return [f"{w} = {'xchg_64' if size == 'u64' else 'xchg32_32'}({at}, {w})"]
        if size == "u64":
            return [f"r0 = cmpxchg_64({at}, r0, {reg})"]
        return [f"w0 = cmpxchg32_32({at}, w0, w{reg[1:]})"]

    def body_item(self, labels: list[str], exit_label: str) -> list[str]:
        """A piece of an inner loop's body; may add a label (an entry into the middle)."""
        c, r = self.c, self.r
        P, Q, S, C, T, B = (r(x) for x in (self.P, self.Q, self.S, self.C, self.T, self.B))
        kind = c.below(20)
        if kind <= 3:
            return self.access(P)
        if kind == 16:  # the step changes inside the body (maybe only on some paths)
            self.shapes.append("step-changes")
            return [c.pick([f"{S} += {c.between(1, 9)}", f"w{S[1:]} = w{S[1:]}",
                            f"{S} = (s32){S}", f"{S} = *(u64 *)(r10 - {-SLOT_STEP})"])]  # fmt: skip
        if kind == 17:  # the walker reloaded from its slot after a store through an alias
            self.shapes.append("walker-reloaded")
            return [f"*(u64 *)(r10 - {-SLOT_SPILL}) = {P}", f"*(u64 *)({Q} + 0) = {T}",
                    f"{P} = *(u64 *)(r10 - {-SLOT_SPILL})", *self.access(P)]  # fmt: skip
        if kind == 18:  # the walker loaded from memory (a list): no longer linear
            self.shapes.append("walker-loaded")
            return [f"{P} = *(u64 *)({c.pick([P, B, 'r10'])} {c.pick(['+ 0', '+ 8', '- 56'])})"]
        if kind == 19:  # arithmetic on the walker that keeps it, or not, linear
            self.shapes.append("walker-arithmetic")
            return [c.pick([f"{P} *= 1", f"{P} <<= 0", f"{P} |= 0", f"{P} -= -8",
                            f"{P} = -{P}", f"{P} ^= 0", f"{P} += {P}", f"{P} -= {S}"])]  # fmt: skip
        if kind == 4:
            self.shapes.append("alias")
            return self.access(Q)
        if kind == 5:  # a stack array: r10 plus a scaled counter (plus the step)
            self.shapes.append("frame-index")
            insns = [f"{T} = {C}", f"{T} <<= {c.below(4)}", f"{T} += r10", f"{T} += {FRAME_ARRAY}"]
            if c.chance(20):
                insns.append(f"{T} += {S}")
            return insns + self.access(T)
        if kind == 6:  # the buffer plus a scaled counter
            self.shapes.append("buffer-index")
            scale = c.below(4)
            insns = [f"{T} = {C}", f"{T} <<= {scale}", f"{T} += {B}"]
            if c.chance(30):
                insns.append(f"{T} += {S}")
            return insns + self.access(T)
        if kind == 7:  # spill the walker, reload it, access through the reload
            self.shapes.append("spill-in-loop")
            return [f"*(u64 *)(r10 - {-SLOT_SPILL}) = {P}", f"{T} = *(u64 *)(r10 - {-SLOT_SPILL})",
                    *self.access(T)]  # fmt: skip
        if kind == 8:  # store through Q (maybe the spill slot), reload the spill
            self.shapes.append("alias-frame")
            return [f"*(u64 *)(r10 - {-SLOT_SPILL}) = {P}", f"*(u64 *)({Q} + 0) = {T}",
                    f"{T} = *(u64 *)(r10 - {-SLOT_SPILL})", *self.access(T)]  # fmt: skip
        if kind == 9:  # a pointer loaded from memory: the region guess
            self.shapes.append("loaded-pointer")
            source = c.pick([f"{P} + 0", f"{B} + 0", f"r10 - {c.pick([56, 64, 72])}", f"{Q} + 0"])
            return [f"{T} = *(u64 *)({source})", f"{T} = *(u8 *)({T} + 0)", f"r0 += {T}"]
        if kind == 10:  # a forward skip inside the body
            skip = self.p.label("skip")
            labels.append(skip)
            return [f"if {c.pick([T, 'r0', C])} & {c.pick([1, 2, 3])} goto {skip}"]
        if kind == 11:  # an exit from the body
            return [f"if r0 == {c.between(0, 40)} goto {exit_label}"]
        if kind == 12:
            self.shapes.append("alias-step")
            return [f"{Q} {c.pick(['+=', '-='])} {c.pick([S, '1', '8'])}"]
        if kind == 13:
            return [f"r0 {c.pick(['^=', '+=', '*='])} {c.pick([T, C, '3'])}"]
        if kind == 14:  # an entry into the middle: a label other blocks may jump to
            mid = self.p.label("mid")
            labels.append(mid)
            self.middles.append(mid)
            return []
        return [f"*(u64 *)(r10 - {c.pick([56, 64, -SLOT_ACC])}) = {P}"]

    def inner_loop(self, head: str, exit_label: str) -> str:
        """Emit an inner loop at `head`; returns the kind of latch it has."""
        c, p, r = self.c, self.p, self.r
        P, S, C = r(self.P), r(self.S), r(self.C)
        p.at(head)
        start = len(p.lines)
        items: list[tuple[list[str], list[str]]] = []
        count = 0
        for _ in range(c.between(0, 4)):
            labels: list[str] = []
            insns = self.body_item(labels, exit_label)
            count += len(insns)
            items.append((labels, insns))
        # an access through the walker that every round makes (no skip jumps over it)
        skips = [
            i for i, (labels, _) in enumerate(items) if any(s.startswith("skip") for s in labels)
        ]
        forced = c.below((skips[0] if skips else len(items)) + 1)
        items.insert(forced, ([], self.access(P)))
        # the step of the walker: once, twice, by a register or a constant, or not at all;
        # mostly after that access, so that the first round of a group is in bounds
        steps = c.pick([[f"{P} += {S}"], [f"{P} += {S}"], [f"{P} -= {S}"],
                        [f"{P} += {S}", f"{P} += {S}"], [f"{P} += {c.between(-9, 9)}"],
                        [f"{P} += {S}", f"{P} += -1"], []])  # fmt: skip
        place = c.between(forced + 1, len(items)) if c.chance(80) else c.below(len(items) + 1)
        items.insert(place, ([], steps))
        for labels, insns in items:
            p.put(*insns)
            for label in labels:
                if label.startswith("skip"):
                    continue
                p.at(label)
        # skips land here, before the latch (still inside the body)
        for labels, _ in items:
            for label in labels:
                if label.startswith("skip"):
                    p.at(label)
        latch = c.below(5)
        self.bound = c.pick([2, 3, 7, 8, 9, 15, 16, 17, 31, 40, 64])
        if latch <= 2:
            p.put(f"{C} += 1", f"if {C} < {self.bound} goto {head}")
            kind = "up"
        elif latch == 3:
            p.put(f"{C} -= 1", f"if {C} != 0 goto {head}")
            kind = "down"
        else:  # a bound from an argument (masked, so that it ends)
            p.put(f"{C} += 1", f"r2 = *(u64 *)(r10 - {-SLOT_EXTRA})", "r2 &= 63",
                  f"if {C} < r2 goto {head}")  # fmt: skip
            kind = "argument"
        if c.chance(10):  # a second latch: the loop has two back edges
            p.lines.insert(-1, f"    if r0 == {c.between(0, 9)} goto {head}")
        # the rounds from a group's first to its last (bpfexec.vm.jit.unroll's rule)
        body = p.lines[start:]
        size = sum(1 + line.endswith(" ll") for line in body if not line.endswith(":"))
        copies = min(MAX_COPIES, GROUP_INSTRUCTIONS // max(size, 1))
        if copies >= 3:
            self.aims.append(copies - 1)
        return kind

    def counter_start(self, latch: str) -> str:
        return f"{self.r(self.C)} = {self.bound if latch == 'down' else 0}"

    def nest(self) -> None:
        """One loop nest; the step its first entry sees aims at its groups."""
        self.loop_nest()
        at = self.p.lines.index("    STEP")
        rest = self.p.lines[at + 1 :]
        del self.p.lines[at:]
        self.step_source(hostile=self.c.chance(50))
        self.p.lines += rest

    def loop_nest(self) -> None:
        """One loop nest: plain, rotated (entered from an outer latch), or nested."""
        c, p, r = self.c, self.p, self.r
        self.middles: list[str] = []
        P, S, outer_n = r(self.P), r(self.S), r(self.O)
        self.walker_source()
        p.put("STEP")  # set once the loop is known, to aim at its groups (`nest`)
        self.alias_source()
        shape = c.pick(["plain", "rotated", "rotated", "rotated", "nested", "tail"])
        self.shapes.append(shape)
        head, done = p.label("loop"), p.label("done")
        if shape == "plain":
            # the counter's start depends on the latch, drawn with the body: set it after
            at = len(p.lines)
            p.put("PLACEHOLDER")
            if c.chance(20):
                p.put(f"if {r(self.T)} & 1 goto MIDDLE")  # patched to a label in the body
            latch = self.inner_loop(head, done)
            p.lines[at] = "    " + self.counter_start(latch)
            self._patch_middle(head)
            p.at(done)
            return
        if shape == "tail":  # a block after the loop jumps back to its head
            at = len(p.lines)
            p.put("PLACEHOLDER", f"{outer_n} = 0")
            latch = self.inner_loop(head, done)
            p.lines[at] = "    " + self.counter_start(latch)
            p.at(done)
            p.put(f"{outer_n} += 1", f"if {outer_n} > {c.between(0, 2)} goto {done}x")
            self.reset(latch)
            if c.chance(60):
                self.step_source(hostile=True)
            target = self.middles[0] if self.middles and c.chance(50) else head
            p.put(f"goto {target}")
            p.at(f"{done}x")
            return
        outer = p.label("outer")
        rounds = c.between(1, 3)
        if shape == "rotated":  # clang's shape: the outer latch jumps to the inner head
            p.put(f"{outer_n} = 0", f"goto {outer}")
            latch = self.inner_loop(head, done)
            p.put(f"{outer_n} += 1")
            p.at(outer)
            p.put(f"if {outer_n} > {rounds} goto {done}")
            self.reset(latch)
            if c.chance(70):  # the first round with a safe step, the next with the argument
                p.put(f"if {outer_n} == 0 goto {head}")
                self.step_source(hostile=True)
                if c.chance(30):
                    p.put(f"{P} += {S}")
            target = self.middles[0] if self.middles and c.chance(30) else head
            p.put(f"goto {target}")
            p.at(done)
            return
        # nested: an outer loop whose body holds the inner loop
        p.put(f"{outer_n} = 0")
        p.at(outer)
        at = len(p.lines)
        p.put("PLACEHOLDER")
        if c.chance(50):
            p.put(f"if {outer_n} == 0 goto {head}")
            self.step_source(hostile=True)
        latch = self.inner_loop(head, done)
        p.lines[at] = "    " + self.counter_start(latch)
        p.at(done)
        p.put(f"{outer_n} += 1")
        if c.chance(50):
            p.put(f"{P} = {r(self.B)}")
        p.put(f"if {outer_n} < {rounds + 1} goto {outer}")

    def reset(self, latch: str) -> None:
        """What an outer latch does before entering the inner loop again."""
        c, p = self.c, self.p
        how = c.pick([0, 0, 0, 2, 3])
        if how <= 1:
            p.put(f"{self.r(self.P)} = {self.r(self.B)}")
        elif how == 2:
            self.walker_source()
        p.put(self.counter_start(latch))

    def _patch_middle(self, head: str) -> None:
        target = self.middles[0] if self.middles else head
        self.p.lines = [line.replace("MIDDLE", target) for line in self.p.lines]

    def call_segment(self) -> None:
        """A spill, a call that may write the spilled slot through a pointer, the reload
        and an access through it; r0 crosses the call in a frame slot."""
        c, p, r = self.c, self.p, self.r
        P, B, T = r(self.P), r(self.B), r(self.T)
        self.shapes.append("call")
        p.put(f"*(u64 *)(r10 - {-SLOT_ACC}) = r0")
        p.put(f"*(u64 *)(r10 - {-SLOT_SPILL}) = {c.pick([B, P]) if self.walking else B}")
        p.put(f"{T} = *(u8 *)({B} + 0)")  # a checked access before the call ...
        slot = c.pick([SLOT_SPILL, SLOT_SPILL, SLOT_ACC, SLOT_SPILL + 4, -56])
        if self.helpers and c.chance(50):
            self.shapes.append("helper")
            p.put("r1 = r10", f"r1 += {slot}")
            if c.chance(50):
                p.put(f"r2 = {B}", f"r2 += {c.below(self.length)}", f"r3 = {c.pick([8, 4, 1])}",
                      f"call {MEMCPY}")  # fmt: skip
            else:
                p.put(f"r2 = {c.below(256)}", f"r3 = {c.pick([8, 4, 1])}", f"call {MEMSET}")
        else:
            how = c.below(3)
            if how == 0:
                p.put("r1 = r10", f"r1 += {slot}")
                p.put(c.pick([f"r2 = *(u64 *)(r10 - {-SLOT_EXTRA})", f"r2 = {T}",
                              f"r2 = {draw_pointer(c, self.length):#x} ll"]))  # fmt: skip
                p.put(f"call {c.pick(['poke', 'poke_low', 'poke_byte'])}")
            elif how == 1:
                p.put(f"r1 = {c.pick([B, P]) if self.walking else B}",
                      f"r2 = *(u64 *)(r10 - {-SLOT_STEP})", f"r3 = {c.between(1, 20)}",
                      f"call {c.pick(['walk', 'walk_param'])}")  # fmt: skip
            else:
                p.put(f"r1 = *(u64 *)(r10 - {-SLOT_EXTRA})", "r1 &= 63", "call stack_array")
        p.put(f"{P} = *(u64 *)(r10 - {-SLOT_SPILL})")  # ... and the use after it
        p.put(*self.access(P))
        p.put(f"{T} = *(u64 *)(r10 - {-SLOT_ACC})", f"r0 += {T}")

    def callees(self) -> None:
        p = self.p
        # writes the caller's frame (or anything) through the pointer it is handed
        p.at("poke")
        p.put("*(u64 *)(r1 + 0) = r2", "r0 = r2", "exit")
        p.at("poke_low")
        p.put("*(u32 *)(r1 + 4) = r2", "r0 = 1", "exit")
        p.at("poke_byte")
        p.put("*(u8 *)(r1 + 0) = r2", "r0 = 2", "exit")
        # an unrolled loop of its own, stepping its parameter (written)...
        p.at("walk")
        p.put("r0 = 0", "r4 = 0")
        p.at("walk_loop")
        p.put("r5 = *(u8 *)(r1 + 0)", "r0 += r5", "r1 += r2", "r4 += 1",
              "if r4 < r3 goto walk_loop", "exit")  # fmt: skip
        # ... and one whose parameter is never written (its translation hoisted)
        p.at("walk_param")
        p.put("r0 = 0", "r4 = 0", "r6 = 0")
        p.at("walk_param_loop")
        p.put("r5 = r1", "r5 += r6", "r5 = *(u8 *)(r5 + 0)", "r0 += r5", "r6 += r2",
              "r4 += 1", "if r4 < r3 goto walk_param_loop", "exit")  # fmt: skip
        # r10 plus an index register, in a callee's frame
        p.at("stack_array")
        p.put("r2 = r10", "r2 += -64", "r2 += r1", "*(u8 *)(r2 + 0) = r1",
              "r3 = r10", "r3 += r1", "r0 = *(u8 *)(r3 - 64)", "exit")  # fmt: skip


def generate(data: bytes) -> Case:
    """The program and inputs the choices in `data` describe."""
    return _Generator(data).generate()


# -- running --------------------------------------------------------------------------------

TIERS = ("optimized", "quick")


def load_case(case: Case, tier: str | None = None) -> Program:
    """The case's program, compiled for `tier` (none: for the interpreter); a compiler
    fault of the JIT (its fallback for a bug of its own) is a Finding."""
    program = vm.load(case.asm.encode(), name="loops.s")
    if tier is not None:
        from bpfexec.vm.jit import compile_program

        compiled = compile_program(program, quick=tier == "quick")
        if getattr(compiled, "failed", False):
            raise Finding(f"the {tier} tier's compiler faulted: {compiled.fallback}")
    return program


def outcome(program: Program, case: Case, fuel: int, engine: str) -> dict[str, Any]:
    """Everything observable about one run (or what it raised)."""
    try:
        result = vm.execute(
            program,
            "main",
            case.arguments,
            fuel=fuel,
            helpers=standard_helpers() if case.helpers else None,
            engine=engine,
        )
    except Exception as exc:  # whatever the interpreter raises, the JIT must raise too
        return {"raised": type(exc).__name__, "message": str(exc)}
    found = result.to_dict()
    del found["duration_ns"]
    return found


class _Faults(logging.Handler):
    """Collects the JIT runtime's error records (a compiler fault is logged, then
    contained: the program runs on the interpreter)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def check(
    case: Case,
    *,
    tiers: Sequence[str] = TIERS,
    announce: Callable[[str], None] | None = None,
) -> dict[str, Any] | None:
    """Run `case` on the interpreter and each tier; raise `Finding` on any difference.
    Returns the interpreter's outcome at the first fuel (None: the program does not
    load, which the generator should not produce)."""
    try:
        reference = load_case(case)
    except LoadError:
        return None
    runtime_log = logging.getLogger("bpfexec.vm.jit.runtime")
    faults = _Faults()
    runtime_log.addHandler(faults)
    try:
        first = _compare(reference, case, tiers, announce)
    finally:
        runtime_log.removeHandler(faults)
    if faults.messages:
        raise Finding(f"the JIT logged an error: {faults.messages[0]}")
    return first


def _compare(
    reference: Program,
    case: Case,
    tiers: Sequence[str],
    announce: Callable[[str], None] | None,
) -> dict[str, Any] | None:
    compiled = {tier: load_case(case, tier) for tier in tiers}
    first: dict[str, Any] | None = None
    for fuel in case.fuels:
        expected = outcome(reference, case, fuel, "interpreter")
        first = first or expected
        for tier, program in compiled.items():
            if announce is not None:
                announce(f"running the {tier} tier with fuel {fuel}")
            actual = outcome(program, case, fuel, "jit")
            if actual != expected:
                differences = {
                    key: (expected.get(key), actual.get(key))
                    for key in sorted(expected.keys() | actual.keys())
                    if expected.get(key) != actual.get(key)
                }
                raise Finding(
                    f"interpreter and jit ({tier}) disagree with fuel {fuel}: "
                    f"(interpreter, jit) = {differences}"
                )
    return first


def target(data: bytes) -> None:
    """The fuzz target: generate from `data`, compare the engines (in this process).
    Without llvmlite, the interpreter alone runs it (nothing may escape)."""
    from bpfexec.vm.machine import available_engines

    check(generate(data), tiers=TIERS if "jit" in available_engines() else ())


# -- regression cases ---------------------------------------------------------------------


def case_file(case: Case, comment: str, *, fuel: int = BUDGET) -> str:
    """`case` as a tests/data/*.data file, its expectation taken from the interpreter
    at `fuel` (the budget .data cases run with). Helper calls cannot be expressed."""
    if case.helpers:
        raise ValueError("a .data case runs without helpers")
    expected = outcome(load_case(case), case, fuel, "interpreter")
    if "raised" in expected:
        raise ValueError(f"the interpreter raised: {expected}")
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    lines += ["-- asm", case.asm.rstrip("\n"), "-- mem"]
    lines += [case.buffer[i : i + 16].hex(" ") for i in range(0, len(case.buffer), 16)]
    if case.args:
        lines += ["-- args", *(f"{value:#x}" for value in case.args)]
    trap = expected["trap"]
    if trap is None:
        lines += ["-- result", f"{expected['return_value']:#x}"]
    else:
        lines += ["-- error", trap["kind"]]
    lines += ["-- fuel", str(expected["fuel_used"])]
    return "\n".join(lines) + "\n"


# -- what a case reaches ------------------------------------------------------------------


def reached(case: Case) -> dict[str, int]:
    """How many loops of the case the optimized tier unrolls, how many of them an
    outer latch enters (a backward jump to the head from outside the body), and how
    many strided accesses they have: the generator's aim, counted. Empty if the
    compiler's analyses cannot be called as they were when this was written."""
    try:
        from bpfexec.vm.interpreter import CALL, JUMP, decode_blocks
        from bpfexec.vm.jit.induction import strided_accesses
        from bpfexec.vm.jit.unroll import unrollable_loops
        from bpfexec.vm.liveness import reachable, successors

        program = load_case(case)
        code = program.instructions
        blocks = decode_blocks(program)
        counts = {"unrolled": 0, "entered-from-outside": 0, "strided": 0}
        entries = {fn.pc for fn in program.functions}
        entries |= {b.target for b in blocks if b is not None and b.kind == CALL}
        for entry in entries:
            pcs = reachable(entry, blocks, code)
            jumps = {pc: successors(blocks[pc], code) for pc in pcs}  # type: ignore[arg-type]
            for head, loop in unrollable_loops(pcs, blocks, code, jumps).items():
                counts["unrolled"] += 1
                counts["strided"] += len(strided_accesses(loop, blocks, code, jumps))
                outside = [
                    pc
                    for pc in pcs
                    if pc not in loop.body
                    and head in jumps[pc]
                    and blocks[pc].kind == JUMP  # type: ignore[union-attr]
                    and blocks[pc].backward  # type: ignore[union-attr]
                ]
                counts["entered-from-outside"] += bool(outside)
        return counts
    except Exception:  # the analyses are internal: statistics only
        return {}
