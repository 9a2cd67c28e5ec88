"""docs/hardening.md carries the table of every knob: it must match the dataclasses."""

from __future__ import annotations

import os
from pathlib import Path

from bpfexec.server.settings import knob_table

DOC = Path(__file__).resolve().parent.parent / "docs" / "hardening.md"
BEGIN, END = "<!-- knobs:begin -->\n", "<!-- knobs:end -->\n"


def test_the_knob_table_is_current() -> None:
    text = DOC.read_text()
    head, _, rest = text.partition(BEGIN)
    table, _, tail = rest.partition(END)
    assert rest, f"{DOC.name} has no {BEGIN.strip()} marker"
    if os.environ.get("BPFEXEC_UPDATE_DOCS"):
        DOC.write_text(head + BEGIN + knob_table() + END + tail)
        return
    assert table == knob_table(), (
        f"{DOC.name} is stale: run BPFEXEC_UPDATE_DOCS=1 pytest tests/test_hardening_doc.py"
    )
