"""Helpers that run the program's own code: `bpf_loop`, `bpf_for_each_map_elem`
and `bpf_tail_call`.

The kernel runs the loop of `bpf_loop(nr, callback, ctx, flags)` in C and calls
the program's `callback` from there. A helper here is Python or native code,
which cannot call into a program's native code, so these two are written in
eBPF instead: the loader appends one function per helper the program calls
(`link_callback_helpers`) and turns each of its call sites into a local call.
They run on both engines as any code does, with fuel charged for every
instruction, a frame of their own (a callback runs one call deeper than its
caller) and the call depth limit; the callbacks are called directly.

A callback is named the way clang writes it, `lddw r2, callback` (the kernel's
`BPF_PSEUDO_FUNC`). It loads a function handle, `function_handle(n)` for the
n-th function whose address the program takes: an address in region 0, never
mapped, so the program can compare it but not read through it. The appended
function dispatches on the handle; a value that is not one is a HELPER_ERROR
trap.

`bpf_tail_call(ctx, prog_array, index)` replaces the running program with the
one stored at `index` of a program array, never returning on success. The
helper raises `TailCall` (a `Trap`, so both engines unwind as for one), and
`bpfexec.vm.machine.run` starts the target with r1 = ctx, a fresh stack and
the fuel left: a restart from the entry, so the loader refuses a tail call in
a function that other functions call, where the kernel would return to that
function's caller. As in the kernel, at most `MAX_TAIL_CALLS` succeed in one
execution; after that, and for an empty or out-of-range index, the call fails
and the program goes on. A program array holds program ids:
`program_id(pc)` of a function's entry.
"""

from __future__ import annotations

from bpfexec.vm import isa
from bpfexec.vm.assembler import assemble
from bpfexec.vm.errors import LoadError, Trap, TrapKind
from bpfexec.vm.helpers import HelperContext, HelperRegistry
from bpfexec.vm.isa import Instruction
from bpfexec.vm.maps import BpfMap
from bpfexec.vm.program import Function, HelperRef

BPF_TAIL_CALL, BPF_FOR_EACH_MAP_ELEM, BPF_LOOP = 12, 164, 181
FUNCTION_HANDLE_BASE = 0x4655_4E00  # function n's handle (region 0: unmapped)
MAX_CALLBACKS = 256
MAX_TAIL_CALLS = 33  # the kernel's MAX_TAIL_CALL_CNT
BPF_MAX_LOOPS = 1 << 23  # the kernel's limit on bpf_loop's nr_loops
EINVAL, E2BIG, ENOENT = 22, 7, 2
PROG_ARRAY = 3

# Private helpers of the appended functions, by name (HelperRef(name=...)).
MAP_NEXT = "bpfexec_map_next"
BAD_CALLBACK = "bpfexec_bad_callback"
_CALLBACK = "bpfexec_callback_"  # + n: a placeholder the loader turns into a local call


def function_handle(n: int) -> int:
    """The value `lddw rX, callback` loads for the n-th callback of a program."""
    return FUNCTION_HANDLE_BASE + n


def program_id(pc: int) -> int:
    """The id a program array holds for the function entered at `pc` (0 is empty)."""
    return pc + 1


class TailCall(Trap):
    """A successful `bpf_tail_call`: `bpfexec.vm.machine.run` restarts at `entry`.

    A Trap so that both engines unwind through it; its kind is what a caller
    that does not restart (none should) would report."""

    def __init__(self, entry: int, context: int) -> None:
        super().__init__(TrapKind.HELPER_ERROR, "bpf_tail_call outside a run that can restart")
        self.entry = entry
        self.context = context


# -- the appended functions ------------------------------------------------------------


def _dispatch(count: int, done: str) -> str:
    """Call the callback whose handle r7 holds (arguments already in r1..r5)."""
    lines = [f"    if r7 == {function_handle(n):#x} goto .Lcall_{n}" for n in range(count)]
    lines += [f"    r1 = r7\n    call {BAD_CALLBACK}\n    exit"]
    for n in range(count):
        lines.append(f".Lcall_{n}:\n    call {_CALLBACK}{n}\n    goto {done}")
    return "\n".join(lines)


def _loop_text(count: int) -> str:
    """bpf_loop(nr, callback, ctx, flags): r9 counts the calls made."""
    return f"""
bpf_loop:
    r0 = -{EINVAL}
    if r4 != 0 goto .Lout
    r0 = -{E2BIG}
    if r1 > {BPF_MAX_LOOPS} goto .Lout
    r6 = r1
    r7 = r2
    r8 = r3
    r9 = 0
.Lnext:
    r0 = r9
    if r9 >= r6 goto .Lout
    r1 = r9
    r2 = r8
{_dispatch(count, ".Lcalled")}
.Lcalled:
    r9 += 1
    if r0 == 0 goto .Lnext
    r0 = r9
.Lout:
    exit
"""


def _for_each_text(count: int, key_room: int) -> str:
    """bpf_for_each_map_elem(map, callback, ctx, flags): the key is copied to this
    frame (below the cursor at r10 - 8), the value is the element's own memory."""
    key = 8 + key_room
    return f"""
bpf_for_each_map_elem:
    r0 = -{EINVAL}
    if r4 != 0 goto .Lout
    r6 = r1
    r7 = r2
    r8 = r3
    r9 = 0
    *(u64 *)(r10 - 8) = r9
.Lnext:
    r1 = r6
    r2 = r10
    r2 += -8
    r3 = r10
    r3 += -{key}
    call {MAP_NEXT}
    if r0 == 0 goto .Ldone
    r3 = r0
    r1 = r6
    r2 = r10
    r2 += -{key}
    r4 = r8
{_dispatch(count, ".Lcalled")}
.Lcalled:
    r9 += 1
    if r0 == 0 goto .Lnext
.Ldone:
    r0 = r9
.Lout:
    exit
"""


def link_callback_helpers(
    instructions: list[Instruction],
    functions: list[Function],
    helper_calls: dict[int, HelperRef],
    callbacks: list[int],
    key_room: int,
    name: str,
) -> None:
    """Append `bpf_loop` and `bpf_for_each_map_elem` when the program calls them
    (by the kernel's numbers) and turn those calls into local calls to them.

    `callbacks` are the entry pcs of the callback handles' functions, in handle
    order; `key_room` is the largest key size of the program's maps, rounded up
    to 8. Everything is changed in place."""
    for pc in callbacks:
        if not any(fn.pc == pc for fn in functions):
            raise LoadError(f"{name}: a callback at pc {pc} is not the start of a function")
    sites: dict[int, list[int]] = {BPF_LOOP: [], BPF_FOR_EACH_MAP_ELEM: []}
    for pc, insn in enumerate(instructions):
        if isa.is_helper_call(insn) and insn.imm in sites and pc not in helper_calls:
            sites[insn.imm].append(pc)
    texts = {
        BPF_LOOP: _loop_text(len(callbacks)),
        BPF_FOR_EACH_MAP_ELEM: _for_each_text(len(callbacks), key_room),
    }
    for number, calls in sites.items():
        if not calls:
            continue
        code = assemble(texts[number], name=f"<helper {number}>")
        base = len(instructions)
        for insn_pc, insn in enumerate(code.instructions):
            pc = base + insn_pc
            ref = code.helper_calls.get(insn_pc)
            if ref is not None and ref.name and ref.name.startswith(_CALLBACK):
                target = callbacks[int(ref.name.removeprefix(_CALLBACK))]
                insn = Instruction(isa.OP_CALL, src=isa.CALL_LOCAL, imm=target - pc - 1)
            elif ref is not None:
                helper_calls[pc] = ref
            instructions.append(insn)
        fn = code.functions[0]
        functions.append(Function(f"<{fn.name}>", base, len(code.instructions), exported=False))
        for pc in calls:
            instructions[pc] = Instruction(isa.OP_CALL, src=isa.CALL_LOCAL, imm=base - pc - 1)


# -- their private helpers, and bpf_tail_call --------------------------------------------


def _map(ctx: HelperContext, handle: int, what: str) -> BpfMap:
    found = ctx.maps.by_handle(handle) if ctx.maps is not None else None
    if found is None:
        raise Trap(TrapKind.HELPER_ERROR, f"{what}: {handle:#x} is not a map")
    return found


def map_next(ctx: HelperContext, handle: int, cursor: int, key: int, *_: int) -> int:
    """The next element of the map from the u64 position at `cursor`: its key
    copied to `key`, the position moved past it; the value's address, or 0."""
    bpf_map = _map(ctx, handle, "bpf_for_each_map_elem")
    position = int.from_bytes(ctx.read(cursor, 8), "little")
    found = bpf_map.next_element(position)
    if found is None:
        return 0
    after, key_bytes, address = found
    ctx.write(key, key_bytes)
    ctx.write(cursor, after.to_bytes(8, "little"))
    return address


def bad_callback(ctx: HelperContext, value: int, *_: int) -> int:
    raise Trap(TrapKind.HELPER_ERROR, f"callback {value:#x} is not a function of the program")


def bpf_tail_call(ctx: HelperContext, context: int, handle: int, index: int, *_: int) -> int:
    bpf_map = _map(ctx, handle, "bpf_tail_call")
    if bpf_map.spec.type != PROG_ARRAY:
        raise Trap(
            TrapKind.HELPER_ERROR, f"bpf_tail_call: map {bpf_map.spec.name!r} is not a prog_array"
        )
    index &= isa.MASK32
    program = bpf_map.id_at(index) if index < bpf_map.spec.max_entries else 0
    if not program or ctx.tail_calls >= MAX_TAIL_CALLS:
        return -ENOENT & isa.MASK64
    ctx.tail_calls += 1
    raise TailCall(program - 1, context)


def register_callback_helpers(registry: HelperRegistry) -> None:
    """Add bpf_tail_call and the appended functions' helpers to the Linux set."""
    registry.register(bpf_tail_call, id=BPF_TAIL_CALL)
    registry.register(map_next, name=MAP_NEXT)
    registry.register(bad_callback, name=BAD_CALLBACK)
