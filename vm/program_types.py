"""Program types: what a program's section makes of its context and return value.

libbpf names a program's type by its section (`SEC("xdp")`, `SEC("tc")`,
`SEC("socket")`, `SEC("syscall")`). The type decides the context the program
gets in r1, which of the context's fields it may read and write, and how its
return value reads (a verdict). A function from any other section, or from an
object without sections, is a `syscall` program: its context is a raw buffer,
as an argument buffer is.

A packet program's context has the kernel's layout (`struct xdp_md`,
`struct __sk_buff`) followed, at `HIDDEN`, by the fields the kernel keeps
out of the program's sight: the 64-bit virtual addresses of the packet's
start, end and metadata, and a redirect's target. The kernel's verifier rewrites a program's 32-bit
loads of `data`, `data_end` and `data_meta` into loads of the real pointers;
`bpfexec.vm.context_access` does the same at load time, so both engines run
the rewritten code and a program turns the field into a working pointer
exactly as it does in the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class ProgramType(Enum):
    SYSCALL = "syscall"
    XDP = "xdp"
    TC = "tc"
    SOCKET = "socket"


# Section names (or their prefix up to the first "/") as libbpf reads them.
_SECTIONS = {
    "xdp": ProgramType.XDP,
    "xdp.frags": ProgramType.XDP,
    "tc": ProgramType.TC,
    "classifier": ProgramType.TC,
    "tcx": ProgramType.TC,
    "socket": ProgramType.SOCKET,
    "syscall": ProgramType.SYSCALL,
}


def program_type(section: str) -> ProgramType:
    """The type of a program from `section`: `xdp`, `xdp/...`, `tc`, `tc/ingress`,
    `classifier`, `tcx/ingress`, `socket`, `socket/...`; anything else is syscall."""
    return _SECTIONS.get(section.split("/", 1)[0], ProgramType.SYSCALL)


# The hidden part of a packet context, after every visible layout: u64 virtual addresses.
HIDDEN = 256
PACKET_DATA = HIDDEN + 0  # the packet's first byte (what `data` reads as)
PACKET_END = HIDDEN + 8  # one past its last byte (`data_end`)
PACKET_META = HIDDEN + 16  # the start of the metadata before it (`data_meta`)
# What `bpf_redirect` asked for: 0, or REDIRECTED | flags << 32 | ifindex.
REDIRECT = HIDDEN + 24
REDIRECTED = 1 << 63
CONTEXT_SIZE = HIDDEN + 32  # bytes of a packet context buffer


@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    size: int  # bytes; an array field (`cb`) is its whole size
    pointer: int | None = None  # the hidden slot a 32-bit load of it reads instead
    writable: frozenset[ProgramType] = frozenset()  # the types that may write it
    readable: frozenset[ProgramType] | None = None  # None: every type of the layout


_TC = frozenset({ProgramType.TC})
_TC_SOCKET = frozenset({ProgramType.TC, ProgramType.SOCKET})

# struct xdp_md (linux/bpf.h): nothing in it is writable.
XDP_MD = (
    Field("data", 0, 4, pointer=PACKET_DATA),
    Field("data_end", 4, 4, pointer=PACKET_END),
    Field("data_meta", 8, 4, pointer=PACKET_META),
    Field("ingress_ifindex", 12, 4),
    Field("rx_queue_index", 16, 4),
    Field("egress_ifindex", 20, 4),
)
XDP_MD_SIZE = 24

# struct __sk_buff (linux/bpf.h), with what tc and socket filters may read and write.
SK_BUFF = (
    Field("len", 0, 4),
    Field("pkt_type", 4, 4),
    Field("mark", 8, 4, writable=_TC),
    Field("queue_mapping", 12, 4, writable=_TC),
    Field("protocol", 16, 4),
    Field("vlan_present", 20, 4),
    Field("vlan_tci", 24, 4),
    Field("vlan_proto", 28, 4),
    Field("priority", 32, 4, writable=_TC),
    Field("ingress_ifindex", 36, 4),
    Field("ifindex", 40, 4),
    Field("tc_index", 44, 4, writable=_TC),
    Field("cb", 48, 20, writable=_TC_SOCKET),
    Field("hash", 68, 4),
    Field("tc_classid", 72, 4, writable=_TC, readable=_TC),
    Field("data", 76, 4, pointer=PACKET_DATA, readable=_TC),
    Field("data_end", 80, 4, pointer=PACKET_END, readable=_TC),
    Field("napi_id", 84, 4),
    Field("data_meta", 140, 4, pointer=PACKET_META, readable=_TC),
    Field("tstamp", 152, 8, writable=_TC, readable=_TC),
    Field("wire_len", 160, 4, readable=_TC),
    Field("gso_segs", 164, 4),
    Field("gso_size", 176, 4),
    Field("hwtstamp", 184, 8, readable=_TC),
)
SK_BUFF_SIZE = 192


def layout(kind: ProgramType) -> tuple[tuple[Field, ...], int]:
    """The visible fields of `kind`'s context and its size; no fields for syscall."""
    if kind is ProgramType.XDP:
        return XDP_MD, XDP_MD_SIZE
    if kind in (ProgramType.TC, ProgramType.SOCKET):
        return SK_BUFF, SK_BUFF_SIZE
    return (), 0


# Verdicts by return value, with the kernel's names (linux/bpf.h, linux/pkt_cls.h).
XDP_VERDICTS = {0: "XDP_ABORTED", 1: "XDP_DROP", 2: "XDP_PASS", 3: "XDP_TX", 4: "XDP_REDIRECT"}
TC_VERDICTS = {
    -1: "TC_ACT_UNSPEC",
    0: "TC_ACT_OK",
    1: "TC_ACT_RECLASSIFY",
    2: "TC_ACT_SHOT",
    3: "TC_ACT_PIPE",
    4: "TC_ACT_STOLEN",
    5: "TC_ACT_QUEUED",
    6: "TC_ACT_REPEAT",
    7: "TC_ACT_REDIRECT",
    8: "TC_ACT_TRAP",
}


def verdict(kind: ProgramType, return_value: int) -> str:
    """The kernel's name for a return value (r0, 64 bits unsigned) of a `kind` program."""
    value = return_value & 0xFFFFFFFF  # the kernel reads r0 as a 32-bit int
    signed = value - (1 << 32) if value >> 31 else value
    if kind is ProgramType.XDP:
        return XDP_VERDICTS.get(value, "XDP_ABORTED")  # what the kernel does with others
    if kind is ProgramType.TC:
        return TC_VERDICTS.get(signed, f"TC_ACT_{signed}")
    if kind is ProgramType.SOCKET:
        return "DROP" if value == 0 else "KEEP"
    return str(return_value)
