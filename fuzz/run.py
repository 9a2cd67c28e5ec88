"""Run one fuzz target under atheris (libFuzzer, coverage-guided).

    python -m fuzz.run TARGET [--strict] [CORPUS_DIR... | FILE...] [-libfuzzer_flag=value...]

TARGET is a name of `fuzz.targets.TARGETS`. libFuzzer writes the inputs that
reach new coverage into the first corpus directory: give one to keep them
between runs, else a fresh temporary directory is used (and printed). The
committed seeds of `fuzz/corpus/TARGET/` are always read, never written;
their known failures (`known-failure-*`) are left out, and the findings of
`fuzz.targets.KNOWN_FAILURES` are ignored (`--strict`: reported), since they
would stop every run at once. A finding stops the run and is saved as
`crash-<sha1>` (or `timeout-...`) in the current directory; docs/fuzzing.md
says how it becomes a regression test. Files instead of directories are run
once (libFuzzer's way to reproduce a crash), or minimized with
`-minimize_crash=1 -runs=N`.

Defaults, which a flag given on the command line overrides: `-timeout=10`
(seconds per input) and `-rss_limit_mb=4096`.

The `loops` target runs JIT code built to defeat its own elided checks: here a
crash of native code ends the run with libFuzzer's "deadly signal". `python -m
fuzz.isolated` is its other driver, which runs cases in a child process and
goes on after a crash (docs/fuzzing.md).
"""

from __future__ import annotations

import contextlib
import importlib
import shlex
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

CORPUS = Path(__file__).parent / "corpus"
KNOWN_FAILURE = "known-failure-"
DEFAULT_FLAGS = ("-timeout=10", "-rss_limit_mb=4096")
# The packages whose coverage guides each search (instrumenting one takes time at
# start-up: the ELF parser only where it is the surface under test). atheris
# instruments whole top-level packages: `bpfexec` is the modules of vm, server
# and client a target imports (only the protocol target imports the last two).
INSTRUMENTED = {
    "elf": ["bpfexec", "fuzz.targets", "elftools"],
    "bytecode": ["bpfexec", "fuzz.targets"],
    "assembler": ["bpfexec", "fuzz.targets"],
    "engines": ["bpfexec", "fuzz.targets"],
    "protocol": ["bpfexec", "fuzz.targets"],
    "loops": ["bpfexec", "fuzz.targets", "fuzz.loops"],
}
# Modules the targets import lazily: imported up front, so that they are instrumented.
LAZY_IMPORTS = {
    "elf": ["bpfexec.vm.elf"],
    "bytecode": ["bpfexec.vm.elf"],
    "engines": ["bpfexec.vm.elf", "bpfexec.vm.interpreter", "bpfexec.vm.jit"],
    "protocol": [
        "bpfexec.vm.elf",
        "bpfexec.vm.interpreter",
        "bpfexec.server.app",
        "bpfexec.server.settings",
        "bpfexec.client.client",
    ],
    "loops": [
        "bpfexec.vm.interpreter",
        "bpfexec.vm.jit",
        "fuzz.loops",
        "bpfexec.vm.builtin_helpers",
    ],
}


def seed_directory(target: str) -> Path:
    """The committed seeds of `target`, or a copy without its known failures."""
    seeds = CORPUS / target
    if not any(path.name.startswith(KNOWN_FAILURE) for path in seeds.iterdir()):
        return seeds
    copy = Path(tempfile.mkdtemp(prefix=f"bpfexec-seeds-{target}-"))
    for path in seeds.iterdir():
        if not path.name.startswith(KNOWN_FAILURE):
            shutil.copy(path, copy)
    return copy


def libfuzzer_argv(target: str, args: Sequence[str], strict: bool = False) -> list[str]:
    """The argv handed to libFuzzer: defaults, the user's flags, then the corpus directories
    (or the files to run)."""
    flags = [arg for arg in args if arg.startswith("-")]
    paths = [arg for arg in args if not arg.startswith("-")]
    # libFuzzer reads the command that runs this target again from argv[0], through the
    # shell, for -jobs, -fork and -minimize_crash.
    again = [sys.executable, "-m", "fuzz.run", target, *(["--strict"] if strict else [])]
    command = shlex.join(again)
    if any(Path(path).is_file() for path in paths):  # inputs to run or minimize
        return [command, *DEFAULT_FLAGS, *flags, *paths]
    if not paths:
        paths = [tempfile.mkdtemp(prefix=f"bpfexec-fuzz-{target}-")]
        print(f"fuzz.run: new inputs go to {paths[0]}", file=sys.stderr)
    return [command, *DEFAULT_FLAGS, *flags, *paths, str(seed_directory(target))]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The target names, without importing the targets (which must be imported instrumented).
    names = sorted(p.name for p in CORPUS.iterdir() if p.is_dir())
    if not argv or argv[0] not in names:
        targets = ",".join(names)
        print(
            f"usage: python -m fuzz.run {{{targets}}} [--strict] [CORPUS_DIR... | FILE...] "
            "[-flag=value...]"
        )
        return 2
    try:
        import atheris
    except ImportError:
        print("fuzz.run: atheris is not installed (pip install -e '.[fuzz]')", file=sys.stderr)
        return 2
    target_name = argv[0]
    strict = "--strict" in argv
    args = [arg for arg in argv[1:] if arg != "--strict"]
    with atheris.instrument_imports(include=INSTRUMENTED[target_name]):
        from fuzz.targets import run

        for module in LAZY_IMPORTS.get(target_name, ()):
            with contextlib.suppress(ImportError):  # bpfexec.vm.jit without llvmlite
                importlib.import_module(module)

    def one_input(data: bytes) -> None:
        run(target_name, data, ignore_known=not strict)

    atheris.Setup(libfuzzer_argv(target_name, args, strict), one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
