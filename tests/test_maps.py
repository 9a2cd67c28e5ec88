"""BPF maps (`bpfexec.vm.maps`) and libbpf-style programs: the kernel's semantics,
on both engines, locally and from the command line.

The programs are tests/fixtures/maps/*.c, written as libbpf programs are
(`#include <bpf/bpf_helpers.h>`, `SEC(".maps")`, kernel helper numbers, a
license); they are compiled here when clang and libbpf-dev are installed, and
the committed objects stand in otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import CompileDirectory

from bpfexec import vm
from bpfexec.vm.errors import LimitError, LoadError
from bpfexec.vm.loader import load
from bpfexec.vm.maps import (
    BPF_ANY,
    BPF_EXIST,
    BPF_NOEXIST,
    E2BIG,
    EEXIST,
    EINVAL,
    ENOENT,
    MapSet,
    check_definitions,
    map_handle,
)
from bpfexec.vm.memory import map_base

FIXTURES = Path(__file__).parent / "fixtures" / "maps"


@pytest.fixture(scope="module")
def objects(libbpf_objects: CompileDirectory) -> Path:
    """The fixtures compiled here (clang and libbpf-dev), else the committed objects."""
    return libbpf_objects(FIXTURES)


def program(objects: Path, name: str) -> vm.Program:
    return load((objects / f"{name}.o").read_bytes(), name=f"{name}.o")


# -- the maps themselves ------------------------------------------------------------


class Spec:
    def __init__(self, type: int, key_size: int, value_size: int, max_entries: int) -> None:
        self.name = f"m{type}"
        self.type, self.key_size, self.value_size = type, key_size, value_size
        self.max_entries, self.map_flags = max_entries, 0


def u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def test_array_semantics():
    (array,) = MapSet([Spec(2, 4, 8, 4)]).maps
    assert array.lookup(u32(3)) == 3 and array.lookup(u32(4)) is None
    assert array.update(u32(1), b"\x05" * 8, BPF_ANY) == 0
    assert array.update(u32(1), b"\x06" * 8, BPF_EXIST) == 0
    assert array.update(u32(1), b"\x07" * 8, BPF_NOEXIST) == -EEXIST
    assert array.update(u32(4), b"\x07" * 8, BPF_ANY) == -E2BIG
    assert array.update(u32(1), b"\x07" * 8, 3) == -EINVAL
    assert array.delete(u32(1)) == -EINVAL
    assert array.entries() == [(u32(1), b"\x06" * 8)]  # only non-zero elements


def test_hash_semantics():
    (table,) = MapSet([Spec(1, 2, 1, 2)]).maps
    assert table.lookup(b"ab") is None
    assert table.update(b"ab", b"\x01", BPF_EXIST) == -ENOENT
    assert table.update(b"ab", b"\x01", BPF_NOEXIST) == 0
    assert table.update(b"ab", b"\x02", BPF_NOEXIST) == -EEXIST
    assert table.update(b"cd", b"\x03", BPF_ANY) == 0
    assert table.update(b"ef", b"\x04", BPF_ANY) == -E2BIG  # full
    assert table.delete(b"ab") == 0 and table.delete(b"ab") == -ENOENT
    assert table.update(b"ef", b"\x04", BPF_ANY) == 0  # the freed slot
    assert table.entries() == [(b"cd", b"\x03"), (b"ef", b"\x04")]
    assert table.address(table.lookup(b"cd") or 0) >> 32 == 9  # map 0's region


def test_lru_evicts_the_least_recently_used():
    (lru,) = MapSet([Spec(9, 1, 1, 2)]).maps
    lru.update(b"a", b"1", BPF_ANY)
    lru.update(b"b", b"2", BPF_ANY)
    lru.lookup(b"a")
    assert lru.update(b"c", b"3", BPF_ANY) == 0
    assert [key for key, _ in lru.entries()] == [b"a", b"c"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (Spec(30, 0, 4, 4), "type bloom_filter (30) is not supported"),
        (Spec(99, 4, 4, 1), "unknown type 99 is not supported"),
        (Spec(2, 8, 4, 1), "an array's key_size must be 4"),
        (Spec(1, 4, 4, 0), "max_entries must be positive"),
        (Spec(2, 4, 1 << 20, 1 << 13), "its values exceed 4 GiB"),
    ],
)
def test_unsupported_definitions_are_one_line_errors(spec, message):
    with pytest.raises(LoadError, match=re.escape(message)):
        check_definitions([spec], "x.o")


def test_map_memory_is_limited(objects):
    data = (objects / "counter.o").read_bytes()
    with pytest.raises(LimitError, match=r"its maps take 8224 bytes, more than the limit of 8000"):
        load(data, name="counter.o", limits=vm.Limits(max_map_bytes=8000))
    assert load(data, name="counter.o", limits=vm.Limits(max_map_bytes=8224)).maps


# -- libbpf-style programs on both engines ----------------------------------------------


def test_a_libbpf_program_counts_in_its_maps(objects, engine):
    prog = program(objects, "counter")
    assert prog.kernel_helpers and [m.name for m in prog.maps] == ["counts", "totals"]
    maps = MapSet(prog.maps)
    results = [vm.execute(prog, "count", [key], maps=maps, engine=engine) for key in (7, 7, 9, 7)]
    assert [r.return_value for r in results] == [1, 2, 1, 3]
    assert results[-1].log == ("key 7 counted 3",)
    dump = maps.dump()
    counts = {e["key"]: e["value"] for e in dump["counts"]["entries"]}
    assert counts == {u32(7).hex(): (3).to_bytes(8, "little").hex(),
                      u32(9).hex(): (1).to_bytes(8, "little").hex()}  # fmt: skip
    assert dump["totals"]["entries"] == [
        {"key": u32(0).hex(), "value": (4).to_bytes(8, "little").hex()}
    ]
    # Without a MapSet, every execution starts from fresh maps.
    assert vm.execute(prog, "count", [7], engine=engine).return_value == 1


def test_errno_results_are_the_kernels(objects, engine):
    result = vm.execute(program(objects, "counter"), "errors", engine=engine)
    assert result.trap is None
    codes = result.return_value.to_bytes(7, "big")
    assert list(codes) == [0, EEXIST, ENOENT, EINVAL, ENOENT, E2BIG, EINVAL]


def test_lru_and_percpu_maps(objects, engine):
    prog = program(objects, "lru")
    maps = MapSet(prog.maps)
    result = vm.execute(prog, "evict", maps=maps, engine=engine)
    assert result.return_value == 0b101  # 1 and 3 remain; CPU 0
    assert maps.dump()["scratch"]["entries"] == [{"key": u32(0).hex(), "value": u32(1).hex()}]


def test_a_program_is_found_by_its_section_name(objects):
    prog = program(objects, "lru")
    assert prog.function("syscall").name == "evict"


def test_map_values_are_checked_memory_and_handles_are_not_pointers(objects, engine):
    counter = program(objects, "counter")
    maps = MapSet(counter.maps)
    size = len(maps.maps[0].values)  # 1024 slots of 8 bytes

    def read(address: int) -> vm.Result:
        code = load(f"r1 = {address:#x} ll\nr0 = *(u64 *)(r1 + 0)\nexit\n".encode())
        return vm.execute(dataclasses.replace(code, maps=counter.maps), maps=maps, engine=engine)

    maps.maps[0].update(u32(1), (42).to_bytes(8, "little"), BPF_ANY)
    assert read(maps.maps[0].address(maps.maps[0].lookup(u32(1)) or 0)).return_value == 42
    assert read(map_base(0) + size - 8).trap is None
    fault = read(map_base(0) + size - 4).trap
    assert fault is not None and "map 0 region of 8192 bytes" in fault.message
    fault = read(map_handle(0)).trap
    assert fault is not None and "unmapped address" in fault.message


def test_threads_share_a_map_without_losing_updates(objects, engine):
    prog = program(objects, "counter")
    maps = MapSet(prog.maps)
    vm.execute(prog, "count", [5], maps=maps, engine=engine)  # the key exists: atomics after

    def hammer() -> None:
        for _ in range(200):
            vm.execute(prog, "count", [5], maps=maps, engine=engine)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    slot = maps.maps[0].lookup(u32(5))
    assert slot is not None
    assert int.from_bytes(maps.maps[0].value(slot), "little") == 801


def test_seed_numbering_is_kept_without_maps_or_license():
    """`call 1` of a program without maps or a license is the caller's helper 1."""
    prog = load(b"r1 = 20\ncall 1\nexit\n")
    assert not prog.kernel_helpers
    helpers = vm.HelperRegistry()
    helpers.register(lambda ctx, a, *_: a + 1, id=1, name="custom")
    assert vm.execute(prog, helpers=helpers).return_value == 21


# -- the command line -----------------------------------------------------------------


def bpfexec(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BPFEXEC_")}
    return subprocess.run([sys.executable, "-m", "bpfexec", *args], capture_output=True,
                          text=True, timeout=60, env=env)  # fmt: skip


@pytest.mark.parametrize("engine", ["interpreter", "jit"])
def test_run_repeat_and_dump_maps(objects, engine):
    proc = bpfexec("run", str(objects / "counter.o"), "--function", "count", "--arg", "7",
                   "--repeat", "3", "--dump-maps", "--engine", engine, "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["return_value"] == 3 and out["log"] == ["key 7 counted 3"]
    assert out["maps"]["counts"] == {
        "type": "hash", "key_size": 4, "value_size": 8, "max_entries": 1024,
        "entries": [{"key": "07000000", "value": "0300000000000000"}],
    }  # fmt: skip
    assert out["maps"]["totals"]["entries"] == [{"key": "00000000", "value": "0300000000000000"}]
    assert "maps" not in json.loads(bpfexec("run", str(objects / "counter.o"), "--function",
                                            "count", "--arg", "7", "--json").stdout)  # fmt: skip


def test_a_co_re_relocation_is_a_one_line_error(libbpf_objects: CompileDirectory) -> None:
    libbpf = libbpf_objects(FIXTURES.parent / "libbpf")
    with pytest.raises(LoadError) as caught:
        load((libbpf / "core.o").read_bytes(), name="core.o")
    assert str(caught.value) == (
        "core.o: CO-RE relocation at pc 0 in 'syscall' (field byte offset of [2] STRUCT "
        "'pair', access 0:1) is not supported: there are no kernel types to relocate against"
    )
