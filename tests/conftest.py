"""Fixtures shared by the whole suite: where the fixtures live, how C becomes eBPF,
which engines a test runs on, and no hidden JIT compiler faults.

`compile_c("loops")` gives the object of `tests/fixtures/c/loops.c`: compiled
now when clang is installed, else the committed `tests/fixtures/obj/` copy
(built by `tests/fixtures/build.sh`), else the test is skipped.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis_process import REDIS, RedisServer

from bpfexec.vm.machine import available_engines

FIXTURES = Path(__file__).parent / "fixtures"
C_SOURCES = FIXTURES / "c"
OBJECTS = FIXTURES / "obj"
CLANG = shutil.which("clang")
LIBBPF = Path("/usr/include/bpf/bpf_helpers.h").exists()  # Debian's libbpf-dev

CompileC = Callable[..., Path]


def clang_flags(opt: str, debug: bool) -> list[str]:
    """The flags of build.sh, so a fresh compile and a committed object match."""
    resource = subprocess.run(
        [CLANG or "clang", "-print-resource-dir"], capture_output=True, text=True, check=True
    ).stdout.strip()
    flags = [opt, "-target", "bpf", "-ffreestanding", "-fdebug-compilation-dir=."]
    flags.append(f"-fdebug-prefix-map={resource}=clang")
    return [*flags, "-g"] if debug else flags


def committed_object(name: str, debug: bool = False) -> Path:
    return OBJECTS / f"{name}{'-g' if debug else ''}-O2.o"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def compile_c(tmp_path_factory: pytest.TempPathFactory) -> CompileC:
    """`compile_c(name, opt="-O2", debug=False) -> Path` of the object for c/<name>.c."""
    built: dict[tuple[str, str, bool], Path] = {}
    out_dir = tmp_path_factory.mktemp("bpf-objects")

    def compile_c(name: str, opt: str = "-O2", debug: bool = False) -> Path:
        key = (name, opt, debug)
        if key in built:
            return built[key]
        source = C_SOURCES / f"{name}.c"
        if not source.exists():
            raise FileNotFoundError(f"no C fixture {source.name} in {C_SOURCES}")
        if CLANG is None:
            committed = committed_object(name, debug)
            if opt != "-O2":
                pytest.skip(f"clang is not installed; only -O2 objects are committed, not {opt}")
            if not committed.exists():
                pytest.skip(f"clang is not installed and there is no committed {committed.name}")
            return committed
        target = out_dir / f"{name}{'-g' if debug else ''}{opt}.o"
        # Relative source name and cwd: the same DWARF file names as build.sh.
        subprocess.run(
            [CLANG, *clang_flags(opt, debug), "-c", source.name, "-o", str(target)],
            cwd=C_SOURCES,
            check=True,
            capture_output=True,
        )
        built[key] = target
        return target

    return compile_c


def multiarch() -> str:
    """`gcc -print-multiarch`: where the kernel's UAPI headers are (`asm/types.h`)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return ""
    return subprocess.run([gcc, "-print-multiarch"], capture_output=True, text=True).stdout.strip()


def libbpf_flags() -> list[str]:
    """How libbpf-style programs are compiled (each fixture directory's build.sh too)."""
    return ["-O2", "-g", "-target", "bpf", f"-I/usr/include/{multiarch()}"]


CompileDirectory = Callable[[Path], Path]


@pytest.fixture(scope="session")
def libbpf_objects(tmp_path_factory: pytest.TempPathFactory) -> CompileDirectory:
    """`libbpf_objects(directory)`: a directory with the objects of `directory/*.c`,
    libbpf-style programs compiled now when clang and libbpf-dev are installed, else
    `directory` itself, whose committed objects stand in."""
    built: dict[Path, Path] = {}

    def compile_directory(directory: Path) -> Path:
        if CLANG is None or not LIBBPF:
            return directory
        if directory not in built:
            out = tmp_path_factory.mktemp(directory.name)
            for source in sorted(directory.glob("*.c")):
                target = out / f"{source.stem}.o"
                subprocess.run(
                    [CLANG, *libbpf_flags(), "-c", str(source), "-o", str(target)],
                    check=True,
                    capture_output=True,
                )
            built[directory] = out
        return built[directory]

    return compile_directory


@pytest.fixture(params=available_engines())
def engine(request: pytest.FixtureRequest) -> str:
    """Run the test on each engine: they must be indistinguishable."""
    return str(request.param)


@pytest.fixture(autouse=True)
def no_compiler_faults(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture):
    """Fail a test in which the JIT compiler faulted. The JIT contains its faults (the
    interpreter runs the program instead), which would otherwise hide them from the
    differential and fuzz tests; `@pytest.mark.compiler_fault` tests cause them."""
    yield
    if request.node.get_closest_marker("compiler_fault"):
        return
    for record in caplog.get_records("call"):
        if record.name == "bpfexec.vm.jit.runtime" and record.levelno >= logging.ERROR:
            pytest.fail(f"{record.getMessage()}: {record.exc_info and record.exc_info[1]!r}")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A `RedisServer` for one test (skipped without `redis-server`), killed after it."""
    if REDIS is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    try:
        yield server
    finally:
        server.kill()
