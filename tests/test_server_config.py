"""Server configuration without a network: settings from flags and environment, the
helper registry and its sources, the built-in helpers."""

from __future__ import annotations

import argparse

import pytest

from bpfexec.server.registry import HelperConfigError, build_registry, import_registry, merge
from bpfexec.server.settings import Settings, add_arguments
from bpfexec.vm import HelperContext, HelperRef, HelperRegistry, Limits, Trap
from bpfexec.vm.builtin_helpers import format_printk, standard_helpers
from bpfexec.vm.memory import Memory, buffer_base


def parse(argv: list[str], environ: dict[str, str]) -> Settings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return Settings.from_args(parser.parse_args(argv), environ)


# Settings: flag > environment > default, for server knobs and VM limits alike.


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        ([], {}, Settings()),
        ([], {"BPFEXEC_PORT": "7000"}, Settings(port=7000)),
        (["--port", "8000"], {"BPFEXEC_PORT": "7000"}, Settings(port=8000)),
        (["--max-fuel", "5"], {}, Settings(limits=Limits(max_fuel=5))),
        ([], {"BPFEXEC_MAX_FUEL": "6"}, Settings(limits=Limits(max_fuel=6))),
        ([], {"BPFEXEC_GRACE_PERIOD": "2.5"}, Settings(grace_period=2.5)),
        ([], {"BPFEXEC_HELPERS": "a:b, c:d"}, Settings(helpers=("a:b", "c:d"))),
        (["--helpers", "x:y", "--helpers", "z:w"], {"BPFEXEC_HELPERS": "a:b"},
         Settings(helpers=("x:y", "z:w"))),
        ([], {"BPFEXEC_ENTRY_POINT_HELPERS": "off"}, Settings(entry_point_helpers=False)),
        (["--entry-point-helpers"], {"BPFEXEC_ENTRY_POINT_HELPERS": "0"}, Settings()),
    ],
)  # fmt: skip
def test_settings_precedence(argv, environ, expected) -> None:
    assert parse(argv, environ) == expected


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"BPFEXEC_PORT": "http"}, "BPFEXEC_PORT='http'"),
        ({"BPFEXEC_PORT": "70000"}, "not a TCP port"),
        ({"BPFEXEC_ENGINE": "turbo"}, "unknown engine 'turbo'"),
        ({"BPFEXEC_MAX_CONCURRENT_EXECUTIONS": "0"}, "at least 1"),
        ({"BPFEXEC_ENTRY_POINT_HELPERS": "maybe"}, "BPFEXEC_ENTRY_POINT_HELPERS"),
        ({"BPFEXEC_STATE_STORE": "/var/states"}, "state_store '/var/states' is not a Redis URL"),
        ({"BPFEXEC_STATE_LEASE_SECONDS": "0"}, "state_lease_seconds must be at least 0.1"),
    ],
)
def test_bad_settings_name_the_knob(environ, message) -> None:
    with pytest.raises(ValueError, match=message):
        parse([], environ)


def test_every_limit_has_a_flag() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {action.dest for action in parser._actions}
    assert {"max_fuel", "default_fuel", "max_call_depth", "max_buffer_bytes"} <= flags


# Helper registry: built-ins, plugins, collisions.


def test_builtin_helpers_keep_kernel_numbers() -> None:
    registry = build_registry(use_entry_points=False)
    numbers = {helper.name: helper.number for helper in registry}
    assert numbers["bpf_ktime_get_ns"] == 5
    assert numbers["bpf_trace_printk"] == 6
    assert numbers["bpf_get_prandom_u32"] == 7
    assert {"memcpy", "memcmp", "memset", "strnlen"} <= set(numbers)


def test_helpers_spec_is_imported_and_merged() -> None:
    registry = build_registry(["seed_helpers:registry"], use_entry_points=False)
    assert HelperRef(42, None) in registry
    assert HelperRef(None, "mul") in registry
    assert HelperRef(6, None) in registry


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:registry", "cannot import"),
        ("seed_helpers:nothing", "has no attribute 'nothing'"),
        ("seed_helpers:helper_max", "expected a HelperRegistry, got function"),
        ("seed_helpers", "MODULE:ATTR"),
    ],
)
def test_bad_helpers_spec(spec, message) -> None:
    with pytest.raises(HelperConfigError, match=message):
        import_registry(spec)


def test_collisions_name_both_sources() -> None:
    other = HelperRegistry()
    other.register(lambda ctx, *regs: 0, id=6, name="my_print")
    with pytest.raises(
        HelperConfigError,
        match="helper number 6 is defined by both built-in helpers and plugin X",
    ):
        merge([("built-in helpers", standard_helpers()), ("plugin X", other)])


# Built-in helpers against real VM memory.


@pytest.fixture
def ctx() -> HelperContext:
    memory = Memory(b"", 512, b"", [bytearray(b"hello\0world\0"), bytearray(8)])
    return HelperContext(memory, [], max_lines=10, max_bytes=1000)


@pytest.mark.parametrize(
    ("fmt", "args", "expected"),
    [
        ("%d %i", (-1, 2**32 - 1), "-1 -1"),
        ("%u %x %X", (2**32 + 5, 255, 255), "5 ff FF"),
        ("%lld %llu %llx", (2**64 - 1, 2**64 - 1, 2**40), f"-1 {2**64 - 1} 10000000000"),
        ("%ld %lu", (2**64 - 2, 3), "-2 3"),
        ("%s, %s!", (buffer_base(0), buffer_base(0) + 6), "hello, world!"),
        ("%p %c 100%%", (buffer_base(1), 65), f"0x{buffer_base(1):x} A 100%"),
        ("no conversions", (), "no conversions"),
    ],
)
def test_trace_printk_format(ctx, fmt, args, expected) -> None:
    assert format_printk(ctx, fmt, args) == expected


@pytest.mark.parametrize(
    ("fmt", "args", "message"),
    [("%5d", (1,), "unsupported conversion"), ("%d %d %d %d", (1, 2, 3), "more conversions")],
)
def test_trace_printk_rejects(ctx, fmt, args, message) -> None:
    with pytest.raises(ValueError, match=message):
        format_printk(ctx, fmt, args)


def test_memory_helpers(ctx) -> None:
    helpers = {helper.name: helper.fn for helper in standard_helpers()}
    src, dst = buffer_base(0), buffer_base(1)
    assert helpers["strnlen"](ctx, src, 100, 0, 0, 0) == 5
    assert helpers["strnlen"](ctx, src, 3, 0, 0, 0) == 3
    assert helpers["memcpy"](ctx, dst, src, 5, 0, 0) == dst
    assert ctx.read(dst, 8) == b"hello\0\0\0"
    assert helpers["memcmp"](ctx, dst, src, 5, 0, 0) == 0
    assert helpers["memcmp"](ctx, dst, src + 6, 5, 0, 0) == (ord("h") - ord("w")) % 2**64
    assert helpers["memset"](ctx, dst, 0x41, 8, 0, 0) == dst
    assert ctx.read(dst, 8) == b"A" * 8
    with pytest.raises(Trap, match="of 1000000 bytes"):
        helpers["memset"](ctx, dst, 0, 1_000_000, 0, 0)
