"""bpfexec.vm.checksum against references written apart from it.

Two references live here. `rfc1071` is the textbook Internet checksum (big-endian
16-bit words, carries folded, complemented), used to build real IPv4/IPv6 + TCP/UDP
packets with valid checksums and to recompute them after a field is rewritten, so every
incremental update is checked against a full recomputation. `x86_csum_partial` replays
the x86-64 kernel's csum_partial instruction by instruction (64-bit add-with-carry
chains, its 40-byte and 64-byte-loop paths, the zero-padded tail), to check the closed
form the module uses bit for bit. Known vectors come from worked examples and from the
kernel's own bpf_csum_diff selftest (tools/testing/selftests/bpf/prog_tests/test_csum_diff.c).

Byte order, as in the module: a checksum field's value is the little-endian u16 of its
bytes; `wire()` gives the network-order value the reference computes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfexec.vm.checksum import (
    BPF_F_HDR_FIELD_MASK,
    BPF_F_IPV6,
    BPF_F_MARK_ENFORCE,
    BPF_F_MARK_MANGLED_0,
    BPF_F_PSEUDO_HDR,
    CHECKSUM_COMPLETE,
    CHECKSUM_NONE,
    CHECKSUM_PARTIAL,
    CHECKSUM_UNNECESSARY,
    CSUM_MANGLED_0,
    EFAULT,
    EINVAL,
    csum_diff,
    csum_diff_legacy,
    csum_fold,
    csum_partial,
    l3_csum_replace,
    l4_csum_replace,
    l4_csum_replace_skb,
)

M16 = 0xFFFF
M32 = 0xFFFF_FFFF
M64 = (1 << 64) - 1
Buf = bytes | bytearray
PROPERTY = settings(max_examples=200, deadline=None)


# --- references -------------------------------------------------------------------------


def ones_sum16(data: Buf) -> int:
    """RFC 1071's sum: big-endian 16-bit words (odd tail padded with 0), carries folded."""
    data = bytes(data)
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & M16) + (total >> 16)
    return total


def rfc1071(data: Buf) -> int:
    """The Internet checksum of `data`, network byte order."""
    return ~ones_sum16(data) & M16


def swap16(value: int) -> int:
    return ((value & 0xFF) << 8) | (value >> 8)


def x86_csum_partial(buf: bytes, seed: int) -> int:
    """arch/x86/lib/csum-partial_64.c replayed step by step on 64-bit registers."""

    def word(at: int) -> int:
        return int.from_bytes(buf[at : at + 8], "little")

    def adc(acc: int, value: int, carry: int) -> tuple[int, int]:
        total = acc + value + carry
        return total & M64, total >> 64

    def chain(acc: int, at: int, words: int) -> int:
        """addq, adcq..., then adcq $0 (its carry out is lost)."""
        carry = 0
        for i in range(words):
            acc, carry = adc(acc, word(at + 8 * i), carry)
        return adc(acc, 0, carry)[0]

    def finalize(acc: int) -> int:
        rotated = ((acc >> 32) | (acc << 32)) & M64
        return ((acc + rotated) & M64) >> 32

    acc = seed & M32
    if len(buf) == 40:
        return finalize(chain(acc, 0, 5))
    at = 0
    if len(buf) >= 64:
        accum = carries = 0
        left = len(buf) - 64
        while True:  # two chains per 64 bytes; their carries counted apart
            carry = 0
            for i in range(4):
                acc, carry = adc(acc, word(at + 8 * i), carry)
            carries += carry
            carry = 0
            for i in range(4, 8):
                accum, carry = adc(accum, word(at + 8 * i), carry)
            carries += carry
            at += 64
            left -= 64
            if left < 0:
                break
        acc, carry = adc(acc, accum, 0)
        acc, carry = adc(acc, carries, carry)
        acc = adc(acc, 0, carry)[0]
    rest = len(buf) - at
    if rest & 32:
        acc, at = chain(acc, at, 4), at + 32
    if rest & 16:
        acc, at = chain(acc, at, 2), at + 16
    if rest & 8:
        acc, at = chain(acc, at, 1), at + 8
    if rest & 7:
        trail = int.from_bytes(buf[at : at + (rest & 7)], "little")
        acc, carry = adc(acc, trail, 0)
        acc = adc(acc, 0, carry)[0]
    return finalize(acc)


def le(data: Buf) -> int:
    """What a program's load of a header field puts in a register (x86: little-endian)."""
    return int.from_bytes(data, "little")


def wire(packet: Buf, offset: int) -> int:
    """The 16-bit field at `offset` in network byte order."""
    return int.from_bytes(packet[offset : offset + 2], "big")


# --- packets ----------------------------------------------------------------------------

ETH = 14  # an Ethernet header first, so offsets are those a tc program uses
IP_CSUM, IP_TTL, SADDR, DADDR, L4 = ETH + 10, ETH + 8, ETH + 12, ETH + 16, ETH + 20
SPORT, DPORT, UDP_CSUM, TCP_CSUM = L4, L4 + 2, L4 + 6, L4 + 16
TCP, UDP = 6, 17


def ipv4_header(src: bytes, dst: bytes, proto: int, l4_len: int, ttl: int, ident: int) -> bytes:
    fields = (0x45, 0, 20 + l4_len, ident, 0x4000, ttl, proto, 0, src, dst)
    header = bytearray(struct.pack("!BBHHHBBH4s4s", *fields))
    header[10:12] = rfc1071(bytes(header)).to_bytes(2, "big")
    return bytes(header)


def pseudo_v4(src: Buf, dst: Buf, proto: int, length: int) -> bytes:
    return bytes(src + dst) + struct.pack("!BBH", 0, proto, length)


def tcp_segment(ports: tuple[int, int], payload: bytes) -> bytes:
    return struct.pack("!HHIIBBHHH", *ports, 0x01020304, 0x0A0B0C0D, 5 << 4, 0x18, 4096, 0, 0) + (
        payload
    )


def udp_datagram(ports: tuple[int, int], payload: bytes) -> bytes:
    return struct.pack("!HHHH", *ports, 8 + len(payload), 0) + payload


def l4_checksum(packet: bytes) -> int:
    """The TCP or UDP checksum `packet` should carry (network order; UDP's 0 sent as 0xffff)."""
    proto = packet[ETH + 9]
    segment = bytearray(packet[L4:])
    offset = 16 if proto == TCP else 6
    segment[offset : offset + 2] = b"\0\0"
    value = rfc1071(pseudo_v4(packet[SADDR : SADDR + 4], packet[DADDR : DADDR + 4], proto,
                              len(segment)) + bytes(segment))  # fmt: skip
    return 0xFFFF if proto == UDP and value == 0 else value


def ip_checksum(packet: Buf) -> int:
    header = bytearray(packet[ETH:L4])
    header[10:12] = b"\0\0"
    return rfc1071(bytes(header))


def frame(
    proto: int,
    src: bytes = bytes([10, 0, 0, 1]),
    dst: bytes = bytes([192, 168, 1, 20]),
    ports: tuple[int, int] = (40000, 443),
    payload: bytes = b"hello, checksum!",
    ttl: int = 64,
    ident: int = 0x1C46,
) -> bytearray:
    """Ethernet + IPv4 + TCP or UDP, every checksum valid."""
    l4 = tcp_segment(ports, payload) if proto == TCP else udp_datagram(ports, payload)
    packet = bytearray(b"\x02" * 12 + b"\x08\x00")
    packet += ipv4_header(src, dst, proto, len(l4), ttl, ident) + l4
    offset = TCP_CSUM if proto == TCP else UDP_CSUM
    packet[offset : offset + 2] = l4_checksum(bytes(packet)).to_bytes(2, "big")
    return packet


def assert_valid(packet: bytearray) -> None:
    """Both checksums in `packet` equal a full recomputation."""
    assert wire(packet, IP_CSUM) == ip_checksum(packet)
    offset = TCP_CSUM if packet[ETH + 9] == TCP else UDP_CSUM
    assert wire(packet, offset) == l4_checksum(bytes(packet))


def test_references_agree_on_a_worked_example() -> None:
    # The IPv4 header of the usual worked example: its checksum on the wire is 0xb861.
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert rfc1071(header) == 0xB861
    assert x86_csum_partial(header, 0) == 0x3B416306
    valid = frame(TCP)
    assert ip_checksum(valid) == wire(valid, IP_CSUM) and rfc1071(bytes(valid[ETH:L4])) == 0


# --- csum_partial and csum_fold ---------------------------------------------------------

WORKED = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")


@pytest.mark.parametrize(
    ("data", "seed", "expected"),
    [
        (b"", 0, 0),
        (b"", 0x12345678, 0x12345678),
        (b"", 0xFFFFFFFF, 0xFFFFFFFF),
        (b"", (7 << 32) | 5, 5),  # the seed is a 32-bit __wsum
        (b"\x01\0\0\0", 0, 1),
        (b"\0\0\0\x80" * 2, 0, 1),  # 2**32 wraps round to 1
        (b"\xff" * 4, 0, 0xFFFFFFFF),
        (b"\xff" * 4, 1, 1),
        (b"\xff" * 8, 0, 0xFFFFFFFF),  # ones'-complement zero stays non-zero
        (b"\0" * 64, 0, 0),
        (b"\x01" * 3, 0, 0x00010101),  # tails: little-endian, zero-padded
        (b"\x01" * 7, 0, 0x01020202),
        (b"\x01" * 40, 0, 0x0A0A0A0A),  # the 40-byte path
        (b"\x01" * 100, 0, 0x19191919),  # the 64-byte loop and every tail step
        (b"\x01" * 128, 0, 0x20202020),
        (b"\xff" * 72, 0, 0xFFFFFFFF),
        (WORKED, 0, 0x3B416306),
        (WORKED, 0x0000_B861, 0x3B421B67),  # the checksum as a seed
    ],
)
def test_csum_partial_known_values(data: bytes, seed: int, expected: int) -> None:
    assert csum_partial(data, seed) == expected
    assert x86_csum_partial(data, seed) == expected


def test_csum_partial_every_length_matches_x86() -> None:
    pattern = bytes((i * 37 + 11) & 0xFF for i in range(300))
    for length in range(len(pattern) + 1):
        for seed in (0, 1, 0xFFFF, 0xFFFFFFFF, 0x89ABCDEF):
            data = pattern[:length]
            assert csum_partial(data, seed) == x86_csum_partial(data, seed), (length, seed)


@PROPERTY
@given(st.binary(max_size=300), st.integers(0, M32))
def test_csum_partial_matches_x86_replay(data: bytes, seed: int) -> None:
    assert csum_partial(data, seed) == x86_csum_partial(data, seed)


@PROPERTY
@given(
    st.lists(st.sampled_from([0, 0xFF, 0x80, 0x01]), max_size=200).map(bytes), st.integers(0, M32)
)
def test_csum_partial_matches_x86_replay_on_carry_heavy_data(data: bytes, seed: int) -> None:
    assert csum_partial(data, seed) == x86_csum_partial(data, seed)


@PROPERTY
@given(st.binary(max_size=200))
def test_folded_csum_partial_is_the_rfc1071_checksum(data: bytes) -> None:
    assert csum_fold(csum_partial(data, 0)) == swap16(rfc1071(data))


def test_csum_fold_known_values() -> None:
    assert csum_fold(0x3B416306) == 0x61B8  # wire 0xb861, the worked example's checksum
    assert csum_fold(0) == 0xFFFF
    assert csum_fold(0xFFFFFFFF) == 0
    assert csum_fold(0xFFFF) == 0
    assert csum_fold(0x10000) == 0xFFFE
    assert csum_fold(0x0001_0001) == 0xFFFD
    assert csum_fold((1 << 32) | 0x10000) == 0xFFFE  # only the low 32 bits count


@PROPERTY
@given(st.integers(0, M32))
def test_csum_fold_matches_the_kernels_two_formulas(value: int) -> None:
    # include/asm-generic/checksum.h: (~sum - ror32(sum, 16)) >> 16
    ror = ((value >> 16) | (value << 16)) & M32
    assert csum_fold(value) == (((~value & M32) - ror) & M32) >> 16
    # arch/x86: add sum << 16 to the high half, add 0xffff with the carry, complement the top
    total = (value & 0xFFFF0000) + ((value << 16) & M32)
    total = (total & M32) + 0xFFFF + (total >> 32)
    assert csum_fold(value) == (~total & M32) >> 16 & M16


# --- csum_diff --------------------------------------------------------------------------


def q(*words: int) -> bytes:
    """The selftest's buffers: arrays of native (little-endian) u64."""
    return struct.pack(f"<{len(words)}Q", *words)


DEAD, BEEF, ABAB = 0xDEADBEEFDEADBEEF, 0xBEEFDEADBEEFDEAD, 0xABABABABABABABAB

# (from, to, seed, result) of the kernel's test_csum_diff.c (push, pull, diff, edge).
SELFTEST = [
    (b"", q(DEAD), 0, 0x3B3B),
    (b"", q(DEAD, BEEF), 0x1234, 0x88AA),
    (b"", q(DEAD, BEEF)[:15], 0x1234, 0xCAA9),
    (q(DEAD), b"", 0, 0xC4C4),
    (q(DEAD, BEEF), b"", 0x1234, 0x9BBD),
    (q(DEAD, BEEF)[:15], b"", 0x1234, 0x59BE),
    (q(DEAD), q(ABAB), 0, 0x7373),
    (q(DEAD)[:7], q(ABAB)[:7], 0, 0xA673),
    (q(0), q(ABAB), 0, 0xAEAE),
    (q(DEAD), q(0), 0xFFFF, 0xC4C4),
    (b"", b"", 0, 0),
    (b"", b"", 0x1234, 0x1234),
    (bytes(512), b"", 0xFFFF, 0xFFFF),
]


@pytest.mark.parametrize(("from_", "to", "seed", "expected"), SELFTEST)
def test_csum_diff_kernel_selftest_vectors(
    from_: bytes, to: bytes, seed: int, expected: int
) -> None:
    assert csum_diff(from_, to, seed) == expected


def c_short(value: int) -> int:
    value &= M16
    return value - 0x10000 if value & 0x8000 else value


@pytest.mark.parametrize(("from_", "to", "seed", "expected"), SELFTEST)
def test_csum_diff_in_two_halves_as_the_selftest_program(
    from_: bytes, to: bytes, seed: int, expected: int
) -> None:
    # The selftest's program chains two calls through a C `short`, sign-extended as the seed.
    f_cut, t_cut = len(from_) - len(from_) // 2, len(to) - len(to) // 2
    first = c_short(csum_diff(from_[:f_cut], to[:t_cut], seed))
    second = c_short(csum_diff(from_[f_cut:], to[t_cut:], first & M64))
    assert second & M16 == expected


def test_csum_diff_forms_and_seed() -> None:
    value = (28).to_bytes(4, "little")
    # The example of the 6.13 change: x86 used to return 0xffffffe3, now 0xffe3 everywhere.
    assert csum_diff_legacy(value, b"", 0) == 0xFFFFFFE3
    assert csum_diff(value, b"", 0) == 0xFFE3
    assert csum_diff(b"", b"", 0xDEADBEEF) == 0x9D9D  # 0xdead + 0xbeef, carry wrapped
    assert csum_diff_legacy(b"", b"", 0xDEADBEEF) == 0xDEADBEEF
    assert csum_diff(b"", b"", (1 << 40) | 0x1234) == 0x1234
    assert csum_diff(b"", value, 0) == 28 and csum_diff_legacy(b"", value, 0) == 28


@pytest.mark.parametrize(("from_size", "to_size"), [(1, 0), (0, 2), (3, 4), (4, 6), (260, 256)])
def test_csum_diff_legacy_rejects_sizes(from_size: int, to_size: int) -> None:
    assert csum_diff_legacy(bytes(from_size), bytes(to_size), 0) == -EINVAL


def test_csum_diff_current_has_no_size_errors() -> None:
    assert csum_diff_legacy(bytes(256), bytes(256), 0) == 0xFFFFFFFF  # 512 is the limit
    assert csum_diff(bytes(260), bytes(256), 0) == 0xFFFF  # 0 - 0: ones'-complement -0
    assert csum_diff(b"\x01", b"", 0) == 0xFFFE
    assert csum_diff(b"", b"\x01\x02\x03", 0) == 0x0201 + 0x03  # LE words 0x0201, 0x0003


@PROPERTY
@given(
    st.integers(0, 64).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n)),
    st.integers(0, 64).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n)),
    st.integers(0, M32),
)
def test_csum_diff_legacy_and_current_are_the_same_sum(from_: bytes, to: bytes, seed: int) -> None:
    old, new = csum_diff_legacy(from_, to, seed), csum_diff(from_, to, seed)
    assert 0 <= new <= M16
    assert (old - new) % M16 == 0
    # And both are the sum of `to` minus that of `from_`, plus the seed.
    assert (new - (le(to) - le(from_) + seed)) % M16 == 0


# --- l3_csum_replace and l4_csum_replace: real packets ----------------------------------


def rewrite(packet: bytearray, offset: int, new: bytes) -> bytes:
    old = bytes(packet[offset : offset + len(new)])
    packet[offset : offset + len(new)] = new
    return old


@pytest.mark.parametrize("proto", [TCP, UDP])
def test_nat_rewrite_of_an_address_size_4(proto: int) -> None:
    packet = frame(proto)
    l4_csum = TCP_CSUM if proto == TCP else UDP_CSUM
    old = rewrite(packet, SADDR, bytes([172, 16, 99, 7]))
    new = packet[SADDR : SADDR + 4]
    assert l3_csum_replace(packet, IP_CSUM, le(old), le(new), 4) == 0
    assert wire(packet, IP_CSUM) == ip_checksum(packet)
    assert wire(packet, l4_csum) != l4_checksum(bytes(packet))  # not yet: the pseudo-header
    flags = 4 | BPF_F_PSEUDO_HDR | (BPF_F_MARK_MANGLED_0 if proto == UDP else 0)
    assert l4_csum_replace(packet, l4_csum, le(old), le(new), flags) == 0
    assert_valid(packet)


def test_rewrites_of_size_2() -> None:
    packet = frame(TCP, ttl=64)
    old = rewrite(packet, IP_TTL, bytes([63, TCP]))  # TTL and protocol share a 16-bit word
    assert l3_csum_replace(packet, IP_CSUM, le(old), le(packet[IP_TTL : IP_TTL + 2]), 2) == 0
    old = rewrite(packet, DPORT, (8443).to_bytes(2, "big"))
    assert l4_csum_replace(packet, TCP_CSUM, le(old), le(packet[DPORT : DPORT + 2]), 2) == 0
    old = rewrite(packet, DADDR + 2, bytes([7, 9]))  # half an address, with the pseudo-header
    new = le(packet[DADDR + 2 : DADDR + 4])
    assert l3_csum_replace(packet, IP_CSUM, le(old), new, 2) == 0
    assert l4_csum_replace(packet, TCP_CSUM, le(old), new, 2 | BPF_F_PSEUDO_HDR) == 0
    assert_valid(packet)


@pytest.mark.parametrize("diff", [csum_diff, csum_diff_legacy])
def test_rewrite_with_a_csum_diff(diff: Callable[[bytes, bytes, int], int]) -> None:
    packet = frame(TCP)
    old = rewrite(packet, SADDR, bytes([100, 64, 1, 2, 100, 64, 3, 4]))  # both addresses
    delta = diff(old, bytes(packet[SADDR : SADDR + 8]), 0)
    assert l3_csum_replace(packet, IP_CSUM, 0, delta, 0) == 0
    assert l4_csum_replace(packet, TCP_CSUM, 0, delta, BPF_F_PSEUDO_HDR) == 0
    old_ports = rewrite(packet, SPORT, struct.pack("!HH", 1234, 80))
    delta = diff(old_ports, bytes(packet[SPORT : SPORT + 4]), 0)
    assert l4_csum_replace(packet, TCP_CSUM, 0, delta, 0) == 0
    assert_valid(packet)


def test_udp_zero_checksum_stays_zero_with_mark_mangled_0() -> None:
    packet = frame(UDP)
    packet[UDP_CSUM : UDP_CSUM + 2] = b"\0\0"  # UDP over IPv4: no checksum
    before = bytes(packet)
    old = rewrite(packet, SADDR, bytes([10, 9, 8, 7]))
    new = le(packet[SADDR : SADDR + 4])
    flags = 4 | BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0
    assert l4_csum_replace(packet, UDP_CSUM, le(old), new, flags) == 0
    assert packet[UDP_CSUM : UDP_CSUM + 2] == b"\0\0"
    # Even a bad size is not looked at: the kernel returns 0 first.
    assert l4_csum_replace(packet, UDP_CSUM, le(old), new, 3 | BPF_F_MARK_MANGLED_0) == 0
    assert packet[:SADDR] == before[:SADDR] and packet[UDP_CSUM:] == before[UDP_CSUM:]
    # Without the flag the "no checksum" 0 is taken for a checksum and mangled.
    plain = bytearray(packet)
    assert l4_csum_replace(plain, UDP_CSUM, le(old), new, 4 | BPF_F_PSEUDO_HDR) == 0
    assert plain[UDP_CSUM : UDP_CSUM + 2] != b"\0\0"
    # MARK_ENFORCE updates a 0 field all the same.
    forced = bytearray(packet)
    assert l4_csum_replace(forced, UDP_CSUM, le(old), new, flags | BPF_F_MARK_ENFORCE) == 0
    assert forced == plain


def port_zeroing_udp_checksum(packet: bytearray) -> int:
    """A destination port for which `packet`'s UDP checksum computes to 0."""
    trial = bytearray(packet)
    trial[DPORT : DPORT + 2] = b"\0\0"
    trial[UDP_CSUM : UDP_CSUM + 2] = b"\0\0"
    rest = ones_sum16(pseudo_v4(trial[SADDR : SADDR + 4], trial[DADDR : DADDR + 4], UDP,
                                len(trial) - L4) + bytes(trial[L4:]))  # fmt: skip
    return M16 - rest


@pytest.mark.parametrize(("flags", "expected"), [(BPF_F_MARK_MANGLED_0, b"\xff\xff"), (0, b"\0\0")])
def test_a_result_of_zero(flags: int, expected: bytes) -> None:
    packet = frame(UDP, payload=b"zero me")
    port = port_zeroing_udp_checksum(packet)
    old = rewrite(packet, DPORT, port.to_bytes(2, "big"))
    assert rfc1071(pseudo_v4(packet[SADDR : SADDR + 4], packet[DADDR : DADDR + 4], UDP,
                             len(packet) - L4) + bytes(packet[L4:UDP_CSUM]) + b"\0\0"
                   + bytes(packet[UDP_CSUM + 2 :])) == 0  # fmt: skip
    assert l4_csum_replace(packet, UDP_CSUM, le(old), le(packet[DPORT : DPORT + 2]), 2 | flags) == 0
    assert packet[UDP_CSUM : UDP_CSUM + 2] == expected
    assert CSUM_MANGLED_0 == 0xFFFF
    if flags:
        assert_valid(packet)  # UDP sends a computed 0 as 0xffff


def test_flags_and_types_are_truncated_as_the_helper_arguments() -> None:
    packet = frame(TCP)
    reference = bytearray(packet)
    old = rewrite(packet, SADDR, bytes([1, 2, 3, 4]))
    rewrite(reference, SADDR, bytes([1, 2, 3, 4]))
    new = le(packet[SADDR : SADDR + 4])
    assert l3_csum_replace(reference, IP_CSUM, le(old), new, 4) == 0
    high = 0xABCD << 40
    assert l3_csum_replace(packet, IP_CSUM, le(old) | high, new | high, 4) == 0
    assert packet == reference
    delta = csum_diff(old, bytes(packet[SADDR : SADDR + 4]), 0)
    assert l4_csum_replace(reference, TCP_CSUM, 0, delta, BPF_F_PSEUDO_HDR) == 0
    assert l4_csum_replace(packet, TCP_CSUM, 0, delta | high, BPF_F_PSEUDO_HDR) == 0
    assert packet == reference
    assert_valid(packet)


# --- errors -----------------------------------------------------------------------------


def call(function: str, packet: bytearray, offset: int, from_: int, to: int, flags: int) -> int:
    if function == "l3":
        return l3_csum_replace(packet, offset, from_, to, flags)
    return l4_csum_replace(packet, offset, from_, to, flags)


@pytest.mark.parametrize("function", ["l3", "l4"])
@pytest.mark.parametrize(
    ("offset", "from_", "flags", "expected"),
    [
        (IP_CSUM, 0, 1 << 8, -EINVAL),  # an unknown flag
        (IP_CSUM, 0, 1 << 63, -EINVAL),
        (IP_CSUM, 0, 1, -EINVAL),  # sizes other than 0, 2, 4
        (IP_CSUM, 0, 3, -EINVAL),
        (IP_CSUM, 0, 8, -EINVAL),
        (IP_CSUM, 0, BPF_F_HDR_FIELD_MASK, -EINVAL),
        (IP_CSUM, 1, 0, -EINVAL),  # a diff with a from
        (IP_CSUM, 1 << 40, 0, -EINVAL),  # ... in any of its 64 bits
        (IP_CSUM + 1, 0, 4, -EFAULT),  # odd
        (-2, 0, 4, -EFAULT),  # a u32: 0xfffffffe
        (0x10000, 0, 4, -EFAULT),  # past 0xffff, even inside the packet
        (None, 0, 4, -EFAULT),  # the field's second byte beyond the packet
        (IP_CSUM + 1, 0, 1 << 8, -EINVAL),  # flags are checked before the offset
        (IP_CSUM + 1, 0, 3, -EFAULT),  # the size after it
    ],
)
def test_errors_leave_the_packet_alone(
    function: str, offset: int | None, from_: int, flags: int, expected: int
) -> None:
    packet = frame(TCP) + bytes(0x10001 - len(frame(TCP)))  # odd length, past 0x10000
    if offset is None:
        offset = len(packet) - 1
    before = bytes(packet)
    assert call(function, packet, offset, from_, 0x1234, flags) == expected
    assert packet == before


@pytest.mark.parametrize("function", ["l3", "l4"])
def test_offset_limits(function: str) -> None:
    packet = bytearray(0x10000)
    assert call(function, packet, 0xFFFE, 0, 0x1234, 4) == 0  # the last field that fits
    assert packet[0xFFFE:] != b"\0\0"
    assert call(function, bytearray(3), 2, 0, 0x1234, 4) == -EFAULT
    # The offset is a u32: its high bits are dropped, as the helper's argument.
    wrapped, plain = bytearray(packet), bytearray(packet)
    assert call(function, wrapped, (1 << 32) | 0xFFFE, 0, 0x4321, 4) == 0
    assert call(function, plain, 0xFFFE, 0, 0x4321, 4) == 0
    assert wrapped == plain


def test_l3_takes_no_l4_flags() -> None:
    for flag in (BPF_F_PSEUDO_HDR, BPF_F_MARK_MANGLED_0, BPF_F_MARK_ENFORCE, BPF_F_IPV6):
        assert l3_csum_replace(frame(TCP), IP_CSUM, 0, 0, flag) == -EINVAL


def test_l4_flags_that_change_nothing_on_a_checksum_none_packet() -> None:
    base = frame(TCP)
    old = rewrite(base, SADDR, bytes([9, 9, 9, 9]))
    new = le(base[SADDR : SADDR + 4])
    results = []
    for extra in (0, BPF_F_IPV6, BPF_F_MARK_ENFORCE, BPF_F_IPV6 | BPF_F_MARK_ENFORCE):
        for complete in (False, True):
            packet = bytearray(base)
            flags = 4 | BPF_F_PSEUDO_HDR | extra
            assert (
                l4_csum_replace(packet, TCP_CSUM, le(old), new, flags, csum_complete=complete) == 0
            )
            results.append(bytes(packet))
    assert len(set(results)) == 1
    packet = bytearray(results[0])
    assert l3_csum_replace(packet, IP_CSUM, le(old), new, 4) == 0
    assert_valid(packet)


# --- skb->csum: CHECKSUM_COMPLETE and CHECKSUM_PARTIAL ----------------------------------


def skb_sum(packet: Buf) -> int:
    """skb->csum of a CHECKSUM_COMPLETE packet at tc: the sum from the network header on."""
    return csum_partial(packet[ETH:], 0)


def same_sum(a: int, b: int) -> bool:
    return (a - b) % M16 == 0


def test_checksum_complete_tracks_a_pseudo_header_change() -> None:
    packet = frame(TCP)
    csum = skb_sum(packet)
    # As Cilium's NAT: store the address without touching skb->csum, then fix both fields.
    old = rewrite(packet, SADDR, bytes([198, 51, 100, 1]))
    new = le(packet[SADDR : SADDR + 4])
    assert not same_sum(csum, skb_sum(packet))
    assert l3_csum_replace(packet, IP_CSUM, le(old), new, 4) == 0
    assert same_sum(csum, skb_sum(packet))  # the IP header's change cancels itself
    flags = 4 | BPF_F_PSEUDO_HDR
    result, csum = l4_csum_replace_skb(
        packet, TCP_CSUM, le(old), new, flags, ip_summed=CHECKSUM_COMPLETE, skb_csum=csum
    )
    assert result == 0 and same_sum(csum, skb_sum(packet))
    assert_valid(packet)
    # A port: the field's change cancels the port's own, and skb->csum is left alone.
    old = rewrite(packet, SPORT, (5555).to_bytes(2, "big"))
    result, after = l4_csum_replace_skb(packet, TCP_CSUM, le(old), le(packet[SPORT : SPORT + 2]),
                                        2, ip_summed=CHECKSUM_COMPLETE, skb_csum=csum)  # fmt: skip
    assert result == 0 and after == csum and same_sum(after, skb_sum(packet))
    assert_valid(packet)


def ipv6_udp(src: bytes, dst: bytes, payload: bytes) -> bytearray:
    udp = bytearray(udp_datagram((5353, 5353), payload))
    pseudo = src + dst + struct.pack("!I3xB", len(udp), UDP)
    udp[6:8] = rfc1071(pseudo + bytes(udp)).to_bytes(2, "big")
    header = struct.pack("!IHBB16s16s", 6 << 28, len(udp), UDP, 64, src, dst)
    return bytearray(b"\x02" * 12 + b"\x86\xdd") + header + udp


def ipv6_udp_valid(packet: Buf) -> bool:
    src, dst, udp = packet[ETH + 8 : ETH + 24], packet[ETH + 24 : ETH + 40], packet[ETH + 40 :]
    return rfc1071(src + dst + struct.pack("!I3xB", len(udp), UDP) + udp) == 0


@pytest.mark.parametrize("ipv6_flag", [BPF_F_IPV6, 0])
def test_bpf_f_ipv6_keeps_skb_csum_of_an_ipv6_diff(ipv6_flag: int) -> None:
    src = bytes.fromhex("20010db8000000000000000000000001")
    packet = ipv6_udp(src, bytes.fromhex("20010db8000000000000000000000002"), b"ipv6 payload")
    assert ipv6_udp_valid(packet)
    csum = skb_sum(packet)
    old = rewrite(packet, ETH + 8, bytes.fromhex("fd000000000000000000000000000abc"))
    delta = csum_diff(old, bytes(packet[ETH + 8 : ETH + 24]), 0)
    udp_csum = ETH + 40 + 6
    flags = BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | ipv6_flag
    result, after = l4_csum_replace_skb(
        packet, udp_csum, 0, delta, flags, ip_summed=CHECKSUM_COMPLETE, skb_csum=csum
    )
    assert result == 0 and ipv6_udp_valid(packet)
    # No IPv6 header checksum: the address and the UDP field cancel in skb->csum. Without
    # the flag the kernel (as before 6.16) subtracts the diff from skb->csum all the same.
    assert same_sum(after, skb_sum(packet)) == bool(ipv6_flag)
    assert (after == csum) == bool(ipv6_flag)


@pytest.mark.parametrize("ip_summed", [CHECKSUM_NONE, CHECKSUM_UNNECESSARY])
def test_skb_csum_is_kept_outside_checksum_complete(ip_summed: int) -> None:
    packet = frame(TCP)
    old = rewrite(packet, SADDR, bytes([1, 1, 1, 1]))
    flags = 4 | BPF_F_PSEUDO_HDR
    result, csum = l4_csum_replace_skb(packet, TCP_CSUM, le(old), le(packet[SADDR : SADDR + 4]),
                                       flags, ip_summed=ip_summed, skb_csum=0x12345678)  # fmt: skip
    assert (result, csum) == (0, 0x12345678)


def test_checksum_partial_updates_only_the_pseudo_header_sum() -> None:
    packet = frame(TCP)
    segment_len = len(packet) - L4

    def pseudo_sum(data: bytes) -> int:
        """A CHECKSUM_PARTIAL field: the uncomplemented, folded pseudo-header sum."""
        pseudo = pseudo_v4(data[SADDR : SADDR + 4], data[DADDR : DADDR + 4], TCP, segment_len)
        return ~csum_fold(csum_partial(pseudo, 0)) & M16

    packet[TCP_CSUM : TCP_CSUM + 2] = pseudo_sum(bytes(packet)).to_bytes(2, "little")
    old = rewrite(packet, DADDR, bytes([203, 0, 113, 9]))
    new = le(packet[DADDR : DADDR + 4])
    flags = 4 | BPF_F_PSEUDO_HDR
    assert l4_csum_replace_skb(packet, TCP_CSUM, le(old), new, flags,
                               ip_summed=CHECKSUM_PARTIAL)[0] == 0  # fmt: skip
    assert le(packet[TCP_CSUM : TCP_CSUM + 2]) == pseudo_sum(bytes(packet))
    old = rewrite(packet, SADDR, bytes([203, 0, 113, 10]))
    delta = csum_diff(old, bytes(packet[SADDR : SADDR + 4]), 0)
    assert l4_csum_replace_skb(packet, TCP_CSUM, 0, delta, BPF_F_PSEUDO_HDR,
                               ip_summed=CHECKSUM_PARTIAL)[0] == 0  # fmt: skip
    assert le(packet[TCP_CSUM : TCP_CSUM + 2]) == pseudo_sum(bytes(packet))
    before = bytes(packet)
    old = rewrite(packet, DPORT, (22).to_bytes(2, "big"))
    assert l4_csum_replace_skb(packet, TCP_CSUM, le(old), le(packet[DPORT : DPORT + 2]), 2,
                               ip_summed=CHECKSUM_PARTIAL)[0] == 0  # fmt: skip
    assert packet[TCP_CSUM : TCP_CSUM + 2] == before[TCP_CSUM : TCP_CSUM + 2]


# --- properties: incremental updates against recomputation ------------------------------

addresses = st.binary(min_size=4, max_size=4)
ports = st.integers(0, M16)
MODES = ["size4", "size2", "diff", "diff_legacy"]


def apply_change(
    packet: bytearray, offset: int, new: bytes, csum_fields: list[tuple[int, int]], mode: str
) -> None:
    """Write `new` at `offset`, then update each (helper, field offset, flags) the way `mode` says.

    `csum_fields` holds (3 or 4, offset) pairs; 4 adds BPF_F_PSEUDO_HDR when the field is
    in the pseudo-header (an address) and MARK_MANGLED_0 for UDP.
    """
    old = rewrite(packet, offset, new)
    pieces = [(0, len(new))] if mode != "size2" else [(i, 2) for i in range(0, len(new), 2)]
    for layer, field in csum_fields:
        extra = 0
        if layer == 4:
            extra |= BPF_F_PSEUDO_HDR if SADDR <= offset < L4 else 0
            extra |= BPF_F_MARK_MANGLED_0 if packet[ETH + 9] == UDP else 0
        for start, size in pieces:
            a, b = old[start : start + size], new[start : start + size]
            if mode == "diff_legacy" and size % 4:
                a, b = a + b"\0\0", b + b"\0\0"  # the old helper takes whole u32s only
            if mode.startswith("diff"):
                delta = (csum_diff if mode == "diff" else csum_diff_legacy)(a, b, 0)
                args = (0, delta, extra)
            else:
                args = (le(a), le(b), size | extra)
            replace = l3_csum_replace if layer == 3 else l4_csum_replace
            flags = args[2] & BPF_F_HDR_FIELD_MASK if layer == 3 else args[2]
            assert replace(packet, field, args[0], args[1], flags) == 0


@PROPERTY
@given(
    proto=st.sampled_from([TCP, UDP]),
    src=addresses,
    dst=addresses,
    sport=ports,
    dport=ports,
    ttl=st.integers(1, 255),
    ident=ports,
    payload=st.binary(max_size=64),
    new_src=addresses,
    new_dst=addresses,
    new_port=ports,
    mode=st.sampled_from(MODES),
)
def test_incremental_updates_equal_recomputation(
    proto: int,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    ttl: int,
    ident: int,
    payload: bytes,
    new_src: bytes,
    new_dst: bytes,
    new_port: int,
    mode: str,
) -> None:
    packet = frame(proto, src, dst, (sport, dport), payload, ttl, ident)
    assert_valid(packet)
    l4 = TCP_CSUM if proto == TCP else UDP_CSUM
    both = [(3, IP_CSUM), (4, l4)]
    apply_change(packet, SADDR, new_src, both, mode)
    apply_change(packet, DADDR, new_dst, both, mode)
    apply_change(packet, DPORT, new_port.to_bytes(2, "big"), [(4, l4)], mode)
    apply_change(packet, IP_TTL, bytes([max(ttl - 1, 0), proto]), [(3, IP_CSUM)], mode)
    assert_valid(packet)


@PROPERTY
@given(
    src=addresses,
    payload=st.binary(max_size=32),
    new_src=addresses,
    new_sport=ports,
    ip_summed=st.sampled_from([CHECKSUM_NONE, CHECKSUM_COMPLETE]),
)
def test_skb_csum_follows_the_packet_under_checksum_complete(
    src: bytes, payload: bytes, new_src: bytes, new_sport: int, ip_summed: int
) -> None:
    packet = frame(TCP, src=src, payload=payload)
    csum = start = skb_sum(packet)
    old = rewrite(packet, SADDR, new_src)
    assert l3_csum_replace(packet, IP_CSUM, le(old), le(new_src), 4) == 0
    result, csum = l4_csum_replace_skb(packet, TCP_CSUM, le(old), le(new_src),
                                       4 | BPF_F_PSEUDO_HDR, ip_summed=ip_summed,
                                       skb_csum=csum)  # fmt: skip
    assert result == 0
    old = rewrite(packet, SPORT, new_sport.to_bytes(2, "big"))
    delta = csum_diff(old, bytes(packet[SPORT : SPORT + 2]), 0)
    result, csum = l4_csum_replace_skb(packet, TCP_CSUM, 0, delta, 0, ip_summed=ip_summed,
                                       skb_csum=csum)  # fmt: skip
    assert result == 0
    assert_valid(packet)
    if ip_summed == CHECKSUM_COMPLETE:
        assert same_sum(csum, skb_sum(packet))
    else:
        assert csum == start


@PROPERTY
@given(field=ports, old=st.integers(0, M64), new=st.integers(0, M64), size=st.sampled_from([2, 4]))
def test_replace_is_the_diff_form(field: int, old: int, new: int, size: int) -> None:
    """Replacing a field by value or by its csum_diff gives the same checksum (up to ±0)."""
    width = 8 * size
    old_bytes = (old & ((1 << width) - 1)).to_bytes(size, "little")
    new_bytes = (new & ((1 << width) - 1)).to_bytes(size, "little")
    for replace in (l3_csum_replace, l4_csum_replace):
        by_value = bytearray(field.to_bytes(2, "little"))
        by_diff = bytearray(by_value)
        assert replace(by_value, 0, old, new, size) == 0
        assert replace(by_diff, 0, 0, csum_diff(old_bytes, new_bytes, 0), 0) == 0
        assert same_sum(le(by_value), le(by_diff))


def test_a_memoryview_packet_is_changed_in_place() -> None:
    """The VM hands its packet memory over as a memoryview: same results as a bytearray."""
    reference = frame(TCP)
    memory = bytearray(reference)
    view = memoryview(memory)
    old = rewrite(reference, SADDR, bytes([5, 6, 7, 8]))
    view[SADDR : SADDR + 4] = bytes([5, 6, 7, 8])
    new = le(reference[SADDR : SADDR + 4])
    for packet in (reference, view):
        assert l3_csum_replace(packet, IP_CSUM, le(old), new, 4) == 0
        assert l4_csum_replace(packet, TCP_CSUM, le(old), new, 4 | BPF_F_PSEUDO_HDR) == 0
    assert memory == reference
    assert_valid(memory)
    assert csum_partial(view[ETH:], 0) == skb_sum(memory)
    assert csum_diff(view[SADDR : SADDR + 4], b"", 0) == csum_diff(bytes([5, 6, 7, 8]), b"", 0)
