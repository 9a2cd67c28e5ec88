"""The Internet-checksum arithmetic of the kernel's packet helpers, as pure functions.

What `bpf_csum_diff` (#28), `bpf_l3_csum_replace` (#10) and `bpf_l4_csum_replace` (#11)
compute on x86-64 Linux (net/core/filter.c of 6.16 and later, include/net/checksum.h,
arch/x86/lib/csum-partial_64.c), over Python bytes-like objects; nothing here knows the VM.

Byte order: everything is what a little-endian x86-64 kernel sees. A 16-bit checksum field
(`__sum16`) is the little-endian u16 of its two bytes in the packet,
`int.from_bytes(packet[offset:offset + 2], "little")`; the checksum in network byte order
is that number byte-swapped (an IPv4 header whose wire checksum is 0xb861 holds 0x61b8
here). `csum_fold` returns, and the replace functions read and write, values in this form.
The `from_`/`to` values of the replace functions are the registers a program passes: a
2- or 4-byte header field loaded with an ordinary (little-endian) load, that is
`int.from_bytes(field_bytes, "little")`. Ones'-complement sums commute with byte swapping,
so no conversion to network order is needed anywhere.

A packet is a bytearray or a writable byte memoryview (the VM's packet memory), changed in
place. Return values are what the helper leaves in r0: 0, a checksum, or a negative errno
as a negative Python int (-EINVAL, -EFAULT); the caller masks it to 64 bits.
"""

from __future__ import annotations

__all__ = [
    "BPF_F_HDR_FIELD_MASK",
    "BPF_F_IPV6",
    "BPF_F_MARK_ENFORCE",
    "BPF_F_MARK_MANGLED_0",
    "BPF_F_PSEUDO_HDR",
    "CHECKSUM_COMPLETE",
    "CHECKSUM_NONE",
    "CHECKSUM_PARTIAL",
    "CHECKSUM_UNNECESSARY",
    "CSUM_DIFF_LEGACY_MAX",
    "CSUM_MANGLED_0",
    "EFAULT",
    "EINVAL",
    "csum_diff",
    "csum_diff_legacy",
    "csum_fold",
    "csum_partial",
    "l3_csum_replace",
    "l4_csum_replace",
    "l4_csum_replace_skb",
]

EFAULT, EINVAL = 14, 22

Buffer = bytes | bytearray | memoryview  # what the sums take: any bytes-like object

# The flags of bpf_l3_csum_replace and bpf_l4_csum_replace (include/uapi/linux/bpf.h).
BPF_F_HDR_FIELD_MASK = 0xF  # the size of the field: 0 (`to` is a checksum diff), 2 or 4
BPF_F_PSEUDO_HDR = 1 << 4  # l4 only: the field is part of the pseudo-header
BPF_F_MARK_MANGLED_0 = 1 << 5  # l4 only: UDP rules, 0 means "no checksum"
BPF_F_MARK_ENFORCE = 1 << 6  # l4 only: with MARK_MANGLED_0, update a 0 field all the same
BPF_F_IPV6 = 1 << 7  # l4 only (Linux 6.16+): the packet is IPv6
CSUM_MANGLED_0 = 0xFFFF  # what a computed 0 is written as under BPF_F_MARK_MANGLED_0

# skb->ip_summed (include/linux/skbuff.h): how the kernel holds an skb's checksum state.
CHECKSUM_NONE, CHECKSUM_UNNECESSARY, CHECKSUM_COMPLETE, CHECKSUM_PARTIAL = 0, 1, 2, 3

CSUM_DIFF_LEGACY_MAX = 512  # before 6.13: from + to had to fit MAX_BPF_STACK bytes

_M16 = 0xFFFF
_M32 = 0xFFFF_FFFF
_M64 = (1 << 64) - 1
_L4_FLAGS = (
    BPF_F_HDR_FIELD_MASK | BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | BPF_F_MARK_ENFORCE | BPF_F_IPV6
)
_INVERT = bytes(255 - byte for byte in range(256))


def _add32(a: int, b: int) -> int:
    """csum_add: 32-bit add whose carry out wraps back into bit 0."""
    total = a + b
    return (total & _M32) + (total >> 32)


def _sub32(a: int, b: int) -> int:
    """csum_sub: add the complement."""
    return _add32(a, ~b & _M32)


def _add16(a: int, b: int) -> int:
    """csum16_add: the 16-bit end-around-carry add."""
    total = a + b
    return (total & _M16) + (total >> 16)


def _from32to16(csum: int) -> int:
    """csum_from32to16: the two halves added with end-around carry; not complemented."""
    return _add16(csum >> 16, csum & _M16)


def csum_partial(data: Buffer, seed: int) -> int:
    """x86-64 `csum_partial`: the unfolded 32-bit ones'-complement sum of `data` plus `seed`.

    Exact for every length. The kernel adds the buffer as little-endian 64-bit words (a
    short final word zero-padded at the top), wrapping each carry back in, then adds the two
    32-bit halves the same way. As 2**64 and 2**32 are both 1 modulo 2**32 - 1, the whole
    buffer read as one little-endian number is congruent to that sum; and an end-around add
    never reaches 0 from anything non-zero, so the result is the representative in
    1..0xffffffff, or 0 when `data` and `seed` are all zero.
    """
    seed &= _M32
    value = int.from_bytes(data, "little")
    if value == 0 and seed == 0:
        return 0
    return (value + seed - 1) % _M32 + 1


def csum_fold(csum: int) -> int:
    """Fold a 32-bit sum to the complemented 16-bit checksum, as the kernel's `csum_fold`.

    The result is the field's value as stored (little-endian u16; see the module's note).
    """
    return ~_from32to16(csum & _M32) & _M16


def csum_diff(from_: Buffer, to: Buffer, seed: int) -> int:
    """`bpf_csum_diff` of Linux 6.13 and later: the sum of `to` minus that of `from_`.

    Starts from `seed` (its low 32 bits, as the helper's __wsum) and is returned reduced to
    16 bits without complement (csum_from32to16), 0..0xffff; with both buffers empty it is
    the seed so reduced. These kernels have no error return: the verifier bounds the sizes,
    and any length is summed (odd ones as csum_partial does). `csum_diff_legacy` is the
    helper of earlier kernels.
    """
    seed &= _M32
    if from_ and to:
        result = _sub32(csum_partial(to, seed), csum_partial(from_, 0))
    elif to:
        result = csum_partial(to, seed)
    elif from_:
        result = ~csum_partial(from_, ~seed & _M32) & _M32
    else:
        result = seed
    return _from32to16(result)


def csum_diff_legacy(from_: Buffer, to: Buffer, seed: int) -> int:
    """`bpf_csum_diff` before Linux 6.13: csum_partial of `from_` complemented, then `to`.

    Returns the unfolded 32-bit sum (zero-extended), `seed` itself (low 32 bits) when both
    are empty, or -EINVAL when a size is not a multiple of 4 or the two together exceed
    CSUM_DIFF_LEGACY_MAX (512) bytes.
    """
    if len(from_) % 4 or len(to) % 4 or len(from_) + len(to) > CSUM_DIFF_LEGACY_MAX:
        return -EINVAL
    return csum_partial(bytes(from_).translate(_INVERT) + bytes(to), seed)


def _replace_by_diff(field: int, diff: int) -> int:
    """csum_replace_by_diff: add a checksum difference to the field."""
    return csum_fold(_add32(diff, ~field & _M32))


def _replace4(field: int, old: int, new: int) -> int:
    """csum_replace4: a 32-bit word of the summed data went from `old` to `new`."""
    return csum_fold(_add32(_sub32(~field & _M32, old), new))


def _replace2(field: int, old: int, new: int) -> int:
    """csum_replace2 (RFC 1624's HC' = ~(~HC + ~m + m')), in 16-bit arithmetic throughout."""
    return ~_add16(_add16(~field & _M16, ~old & _M16), new) & _M16


def _field_error(packet: bytearray | memoryview, offset: int) -> int:
    """The helpers' offset checks: -EFAULT past 0xffff, odd, or beyond the packet; else 0."""
    if offset > 0xFFFF or offset & 1 or offset + 2 > len(packet):
        return -EFAULT
    return 0


def l3_csum_replace(
    packet: bytearray | memoryview, offset: int, from_: int, to: int, flags: int
) -> int:
    """`bpf_l3_csum_replace`: update the checksum field at `packet[offset:offset + 2]`.

    The low 4 bits of `flags` are the size of the changed field: 2 or 4 (`from_` and `to`
    its old and new value, truncated to that size), or 0 (`to` is a checksum difference such
    as `csum_diff` gives, and `from_` must be 0). Any other flag, another size, or a non-zero
    `from_` with size 0 is -EINVAL; an offset past 0xffff, odd, or whose field does not fit
    in the packet is -EFAULT (flags are checked first, the size after the offset, as the
    kernel does). Returns 0 after writing the field; on error the packet is unchanged.
    """
    flags &= _M64
    from_ &= _M64
    to &= _M64
    offset &= _M32  # the helper's offset is a u32
    if flags & ~BPF_F_HDR_FIELD_MASK:
        return -EINVAL
    if error := _field_error(packet, offset):
        return error
    field = int.from_bytes(packet[offset : offset + 2], "little")
    size = flags & BPF_F_HDR_FIELD_MASK
    if size == 0:
        if from_:
            return -EINVAL
        field = _replace_by_diff(field, to & _M32)
    elif size == 2:
        field = _replace2(field, from_ & _M16, to & _M16)
    elif size == 4:
        field = _replace4(field, from_ & _M32, to & _M32)
    else:
        return -EINVAL
    packet[offset : offset + 2] = field.to_bytes(2, "little")
    return 0


def l4_csum_replace(
    packet: bytearray | memoryview,
    offset: int,
    from_: int,
    to: int,
    flags: int,
    *,
    csum_complete: bool = False,
) -> int:
    """`bpf_l4_csum_replace`: update the checksum field at `packet[offset:offset + 2]`.

    Sizes, offsets and errors as `l3_csum_replace`, plus the flags BPF_F_PSEUDO_HDR,
    BPF_F_MARK_MANGLED_0 (a field that is 0 is left alone and 0 returned, before the size is
    even looked at; a result of 0 is written as CSUM_MANGLED_0, 0xffff), BPF_F_MARK_ENFORCE
    (with MARK_MANGLED_0: update a 0 field all the same) and BPF_F_IPV6.

    The field is updated the same way whether the skb is CHECKSUM_NONE (csum_complete=False,
    as a test run's packets are) or CHECKSUM_COMPLETE: there, BPF_F_PSEUDO_HDR and BPF_F_IPV6
    change only skb->csum, which this function does not return; `l4_csum_replace_skb`
    does. So here those two flags change nothing but what is accepted.
    """
    ip_summed = CHECKSUM_COMPLETE if csum_complete else CHECKSUM_NONE
    result, _ = l4_csum_replace_skb(packet, offset, from_, to, flags, ip_summed=ip_summed)
    return result


def l4_csum_replace_skb(
    packet: bytearray | memoryview,
    offset: int,
    from_: int,
    to: int,
    flags: int,
    *,
    ip_summed: int = CHECKSUM_NONE,
    skb_csum: int = 0,
) -> tuple[int, int]:
    """`l4_csum_replace` on an skb in state `ip_summed`: (r0, skb->csum afterwards).

    CHECKSUM_NONE and CHECKSUM_UNNECESSARY: the field is updated, skb->csum kept.
    CHECKSUM_COMPLETE: the same field update; with BPF_F_PSEUDO_HDR skb->csum absorbs the
    change too (the pseudo-header lies outside the summed data, the checksum field inside),
    except for a size-0 diff under BPF_F_IPV6. CHECKSUM_PARTIAL: the field holds the
    uncomplemented pseudo-header sum, and only a BPF_F_PSEUDO_HDR change updates it.
    """
    flags &= _M64
    from_ &= _M64
    to &= _M64
    offset &= _M32
    skb_csum &= _M32
    if flags & ~_L4_FLAGS:
        return -EINVAL, skb_csum
    if error := _field_error(packet, offset):
        return error, skb_csum
    pseudo = bool(flags & BPF_F_PSEUDO_HDR)
    mangled_0 = bool(flags & BPF_F_MARK_MANGLED_0)
    field = int.from_bytes(packet[offset : offset + 2], "little")
    if mangled_0 and not flags & BPF_F_MARK_ENFORCE and field == 0:
        return 0, skb_csum
    size = flags & BPF_F_HDR_FIELD_MASK
    complete = ip_summed == CHECKSUM_COMPLETE
    if size == 0:
        if from_:
            return -EINVAL, skb_csum
        diff = to & _M32
        if ip_summed != CHECKSUM_PARTIAL:
            field = _replace_by_diff(field, diff)
            if complete and pseudo and not flags & BPF_F_IPV6:
                skb_csum = ~_sub32(diff, skb_csum) & _M32
        elif pseudo:
            field = ~csum_fold(_add32(diff, field)) & _M16
    elif size in (2, 4):
        # A 2-byte change goes through the 4-byte path, zero-extended (inet_proto_csum_replace2).
        width = _M16 if size == 2 else _M32
        old, new = from_ & width, to & width
        if ip_summed != CHECKSUM_PARTIAL:
            field = _replace4(field, old, new)
            if complete and pseudo:
                skb_csum = ~_add32(_sub32(~skb_csum & _M32, old), new) & _M32
        elif pseudo:
            field = ~csum_fold(_add32(_sub32(field, old), new)) & _M16
    else:
        return -EINVAL, skb_csum
    if mangled_0 and field == 0:
        field = CSUM_MANGLED_0
    packet[offset : offset + 2] = field.to_bytes(2, "little")
    return 0, skb_csum
