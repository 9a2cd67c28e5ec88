"""The server's in-process helpers: the standard set plus plugins.

Sources, merged in this order into one `bpfexec.vm.HelperRegistry`:

1. the built-in standard set (`bpfexec.vm.builtin_helpers`);
2. every entry point of the group `bpfexec.helpers`, each resolving to a
   `HelperRegistry` (a package declares
   `[project.entry-points."bpfexec.helpers"] name = "pkg.module:registry"`);
3. every `--helpers MODULE:ATTR` spec, in the order given;
4. every `--native-helpers LIBRARY:SYMBOL[=NUMBER]` (`bpfexec.vm.native`).

A helper number or name defined by two sources is an error naming both: a
server whose helper meaning depends on plugin load order would be a trap for
whoever debugs it. This module only assembles the registry; it does not run
or count helpers.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import entry_points

from bpfexec.vm import Helper, HelperRegistry
from bpfexec.vm.builtin_helpers import standard_helpers
from bpfexec.vm.helpers import import_registry as vm_import_registry
from bpfexec.vm.native import native_registry

ENTRY_POINT_GROUP = "bpfexec.helpers"


class HelperConfigError(Exception):
    """A helper source cannot be used; the message names the source and the problem."""


def build_registry(
    specs: Iterable[str] = (), *, use_entry_points: bool = True, native: Iterable[str] = ()
) -> HelperRegistry:
    """The standard helpers, plus entry-point plugins, `MODULE:ATTR` specs and native
    helpers."""
    sources: list[tuple[str, HelperRegistry]] = [("built-in helpers", standard_helpers())]
    if use_entry_points:
        for point in entry_points(group=ENTRY_POINT_GROUP):
            label = f"entry point {point.name!r} ({point.value})"
            try:
                loaded = point.load()
            except Exception as exc:
                raise HelperConfigError(f"cannot load helpers from {label}: {exc}") from exc
            if not isinstance(loaded, HelperRegistry):
                raise HelperConfigError(
                    f"{label} is a {type(loaded).__name__}, not a bpfexec.vm.HelperRegistry"
                )
            sources.append((label, loaded))
    for spec in specs:
        sources.append((f"--helpers {spec}", import_registry(spec)))
    for spec in native:
        try:
            sources.append((f"--native-helpers {spec}", native_registry(spec)))
        except ValueError as exc:
            raise HelperConfigError(str(exc)) from None
    return merge(sources)


def import_registry(spec: str) -> HelperRegistry:
    """Import the HelperRegistry named by `MODULE:ATTR` (the working directory first)."""
    try:
        return vm_import_registry(spec)
    except ValueError as exc:
        raise HelperConfigError(str(exc)) from exc


def merge(sources: Iterable[tuple[str, HelperRegistry]]) -> HelperRegistry:
    """One registry from labelled ones; a number or name in two of them is an error."""
    merged = HelperRegistry()
    owners: dict[int | str, str] = {}
    for label, registry in sources:
        for helper in registry:
            for key in _keys(helper):
                if key in owners:
                    what = f"number {key}" if isinstance(key, int) else f"name {key!r}"
                    raise HelperConfigError(
                        f"helper {what} is defined by both {owners[key]} and {label}"
                    )
            for key in _keys(helper):
                owners[key] = label
            merged.register(helper.fn, id=helper.number, name=helper.name, cost=helper.cost)
    return merged


def _keys(helper: Helper) -> list[int | str]:
    return [key for key in (helper.number, helper.name) if key is not None]
