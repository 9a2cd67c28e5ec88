"""Packets per second of `bpfexec test-run`'s engine over a large capture, side by side.

    python bench/bench_test_run.py [--packets 200000] [--repeat 3]

The capture (written once to a temporary pcap) mixes UDP, TCP, 802.1Q-tagged and
IPv6 frames. The program is `xdp_count` of tests/fixtures/packets/xdp_count.c
(parses Ethernet, a VLAN tag, IPv4 and UDP, counts protocols in an array map):
compiled with clang when present, else the committed object. The rows, each the
best of `--repeat` runs:

- reading the capture alone (`bpfexec.client.captures`);
- `run_packets` over the capture (reading included) on the interpreter (a tenth
  of the packets) and on the JIT;
- the same on the JIT with `xdp_pass` (`return XDP_PASS`): the per-packet cost of
  the test-run path itself, which the parsing program's figure is read against;
- `run_batch` of the seed's `example` on the JIT: the batch path's own overhead.

Goal (issue 20): one million packets a second through the JIT on one core,
capture reading included. The table is markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bpfexec.client.captures import Packet, read_capture, write_capture
from bpfexec.vm import Program, load
from bpfexec.vm.batch import run_batch
from bpfexec.vm.maps import MapSet
from bpfexec.vm.packet_run import run_packets

ROOT = Path(__file__).resolve().parents[1]
PACKETS = ROOT / "tests" / "fixtures" / "packets"
EXAMPLE = ROOT / "tests" / "fixtures" / "obj" / "example-O2.o"
PASS = b"r0 = 2\nexit\n"  # XDP_PASS, as assembly (a section is set below)


def frames() -> list[bytes]:
    mac = b"\x02\x00\x00\x00\x00\x01\x02\x11\x22\x33\x44\x55"
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 33, 0, 0, 64, 17, 0, b"\n\0\0\1", b"\n\0\0\2")
    udp = struct.pack("!HHHH", 4242, 53, 13, 0) + b"hello"
    tcp_ip = ip[:9] + b"\x06" + ip[10:]
    return [
        mac + b"\x08\x00" + ip + udp,
        mac + b"\x08\x00" + tcp_ip + bytes(21),
        mac + b"\x81\x00\x00\x05\x08\x00" + ip + udp,
        mac + b"\x86\xdd" + bytes(60),
    ]


def write(path: Path, count: int) -> None:
    kinds = frames()
    write_capture(path, 1, (Packet(kinds[n % 4], n * 1000) for n in range(count)))


def best(run: Callable[[], int], repeat: int) -> float:
    """Items a second: the best of `repeat` runs of `run` (which returns its count)."""
    rate = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        count = run()
        rate = max(rate, count / (time.perf_counter() - start))
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        out = Path(temporary)
        capture = out / "mixed.pcap"
        write(capture, args.packets)
        small = out / "small.pcap"
        write(small, max(args.packets // 10, 1))
        source = PACKETS / "xdp_count.o"
        clang = shutil.which("clang")
        if clang is not None:
            source = out / "xdp_count.o"
            flags = ["-O2", "-g", "-target", "bpf", f"-I/usr/include/{_multiarch()}"]
            subprocess.run([clang, *flags, "-c", str(PACKETS / "xdp_count.c"), "-o", str(source)],
                           check=True)  # fmt: skip
        parsing = load(source.read_bytes(), "xdp_count.o")
        passing = _in_section(load(PASS), "xdp")
        example = load(EXAMPLE.read_bytes(), "example-O2.o")

        def packets(path: Path) -> Iterator[bytes]:
            with read_capture(path) as reader:
                for packet in reader:
                    yield packet.data

        def reading() -> int:
            return sum(1 for _ in packets(capture))

        def running(program: Program, function: str, engine: str, path: Path) -> Callable[[], int]:
            def go() -> int:
                maps = MapSet(parsing.maps) if program is parsing else None
                results = run_packets(program, function, packets(path), engine=engine, maps=maps)
                return sum(1 for _ in results)

            return go

        def batch() -> int:
            inputs = ([n % 8, n] for n in range(args.packets))
            return sum(1 for _ in run_batch(example, "example", inputs, engine="jit"))

        rows = [
            ("reading the capture", best(reading, args.repeat)),
            (
                "xdp_count, interpreter",
                best(running(parsing, "xdp_count", "interpreter", small), args.repeat),
            ),
            ("xdp_count, JIT", best(running(parsing, "xdp_count", "jit", capture), args.repeat)),
            ("xdp_pass, JIT", best(running(passing, "xdp_pass", "jit", capture), args.repeat)),
            ("run_batch of example, JIT", best(batch, args.repeat)),
        ]
    print(f"{args.packets} packets (interpreter: {max(args.packets // 10, 1)})\n")
    print("| path | packets/s | µs a packet |")
    print("| --- | ---: | ---: |")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} | {1e6 / rate:.2f} |")


def _in_section(program: Program, section: str) -> Program:
    functions = tuple(
        dataclasses.replace(fn, name="xdp_pass", section=section) for fn in program.functions
    )
    return dataclasses.replace(program, functions=functions)


def _multiarch() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        return ""
    return subprocess.run([gcc, "-print-multiarch"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
