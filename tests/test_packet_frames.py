"""The native frame builder (vm/jit/packet_frames.py) against the Python one, byte for byte.

Every run's context and frame, and its row of the batch loop's buffer table,
must be what `packet_run._arguments` builds for the same packet: for XDP, tc
and socket filters, over the MAC and ethertype cases `eth_type_trans` tells
apart, the shortest packets, a tc frame's tailroom, repeats and a first run
other than 0.
"""

from __future__ import annotations

from array import array

import pytest
from test_packet_run import asm_program

pytest.importorskip("llvmlite")

from bpfexec.vm.batch import BUFFER_WORDS
from bpfexec.vm.jit.packet_frames import build_frames
from bpfexec.vm.machine import Unpassed
from bpfexec.vm.packet_helpers import MAX_SKB_LEN
from bpfexec.vm.packet_run import PacketChunk, _arguments, frame_size, run_packet_chunks
from bpfexec.vm.program_types import CONTEXT_SIZE, ProgramType

HOST, OTHER = bytes(6), b"\x02\x00\x00\x00\x00\x01"
BROADCAST, MULTICAST = b"\xff" * 6, b"\x01\x00\x5e\x00\x00\x01"
SOURCE = b"\x02\x11\x22\x33\x44\x55"
PACKETS = [
    HOST + SOURCE + b"\x08\x00" + bytes(range(40)),  # IPv4 to us
    OTHER + SOURCE + b"\x86\xdd" + bytes(60),  # IPv6 to another host
    OTHER + SOURCE + b"\x00\x40\xff",  # 802.3 with one LLC byte (then the next's 0xff)
    BROADCAST + SOURCE + b"\x08\x06" + bytes(28),  # ARP, broadcast
    MULTICAST + SOURCE + b"\x81\x00\x00\x05\x08\x00" + bytes(30),  # tagged, multicast
    HOST + SOURCE + b"\x00\x40" + b"\xff\xff" + bytes(20),  # 802.3, raw IPX
    HOST + SOURCE + b"\x00\x40" + b"\xaa\xaa" + bytes(20),  # 802.3, 802.2 LLC
    OTHER + SOURCE + b"\x00\x40",  # 802.3 with no LLC bytes at all: 14 bytes
    HOST + SOURCE + b"\x08\x00" + bytes(3900),  # an XDP frame larger than a page
]


@pytest.mark.parametrize("kind", [ProgramType.XDP, ProgramType.TC, ProgramType.SOCKET])
@pytest.mark.parametrize(("first", "repeat"), [(0, 1), (0, 2), (3, 2)])
@pytest.mark.parametrize("tailroom", [0, MAX_SKB_LEN], ids=["fitted", "tailroom"])
def test_every_run_is_what_python_builds(
    kind: ProgramType, first: int, repeat: int, tailroom: int
) -> None:
    chunk = PacketChunk.of(PACKETS)
    runs = len(PACKETS) * repeat - first
    stride = CONTEXT_SIZE + frame_size(kind, chunk.longest, tailroom) + 8
    arena = bytearray(b"\xee" * (runs * stride))  # stale bytes: the builder must zero
    table = array("Q", bytes(8 * BUFFER_WORDS * runs))
    build_frames(kind, chunk.data, chunk.offsets, first, runs, repeat, arena, stride, table,
                 tailroom)  # fmt: skip
    address = table[0]  # slot 0's context: the arena's first byte
    for slot in range(runs):
        packet = PACKETS[(first + slot) // repeat]
        context, frame = _arguments(kind, packet, tailroom)
        assert isinstance(frame, Unpassed)
        at = slot * stride
        row = table[slot * BUFFER_WORDS : (slot + 1) * BUFFER_WORDS]
        assert row[0] - address == at and row[1] == CONTEXT_SIZE
        assert row[2] - address == at + CONTEXT_SIZE and row[3] == len(frame)
        assert list(row[4:]) == [0] * (BUFFER_WORDS - 4)
        assert bytes(arena[at : at + CONTEXT_SIZE]) == context, (slot, packet[:16].hex())
        built = bytes(arena[at + CONTEXT_SIZE : at + CONTEXT_SIZE + len(frame)])
        assert built == bytes(frame), (slot, packet[:16].hex())


@pytest.mark.parametrize(
    "offsets",
    [[0, 60, 20], [0, 60, 10_000], [0, 60, 70]],
    ids=["backwards", "beyond-the-bytes", "a-runt"],
)
def test_a_chunk_that_does_not_hold_together_is_refused(offsets: list[int]) -> None:
    data = bytes(120) + b"\0\0"
    arena = bytearray(2 * 4400)
    table = array("Q", bytes(8 * BUFFER_WORDS * 2))
    with pytest.raises(ValueError, match="packet 1 of the chunk is out of its bounds"):
        build_frames(ProgramType.TC, data, array("Q", offsets), 0, 2, 1, arena, 4400, table)
    assert arena[4400:] == bytes(4400)  # nothing laid out for the bad packet


def test_a_chunk_that_lies_about_its_longest_packet_is_refused() -> None:
    # A PacketChunk made by hand with `longest` too small: its stride would not hold
    # the frame of the longer packet; the loop stops before writing past it.
    good = PacketChunk.of([PACKETS[0], PACKETS[-1]])
    lying = PacketChunk(good.data, good.offsets, longest=60, shortest=good.shortest)
    program = asm_program("r0 = 2\nexit\n")  # XDP_PASS
    with pytest.raises(ValueError, match="packet 1 of the chunk is out of its bounds"):
        list(run_packet_chunks(program, None, [lying], engine="jit"))
