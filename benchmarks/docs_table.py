"""The one writer of measured tables in docs/: a benchmark script builds its table from the JSON it
has just written and replaces the block between ``<!-- table:NAME -->`` and ``<!-- /table -->`` in
a docs page with it, stamped with the date, the machine and the command that measured it. So a
figure in docs/ is always the last run's, and says where it came from.

    >>> import docs_table                      # benchmarks/ is the script's directory
    >>> docs_table.write("measured/spmm.md", "spmm", ["K x N", "70%"], [["768 x 768", "2.8x"]],
    ...                  source="benchmarks/out/spmm.json")
"""
from __future__ import annotations

import datetime
import re
import shlex
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
END = "<!-- /table -->"


def begin(name: str) -> str:
    return f"<!-- table:{name} -->"


def markdown(columns, rows) -> str:
    """A GitHub markdown table; ``None`` cells print as ``-``."""
    def cell(v) -> str:
        return "-" if v is None else str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def relative(path) -> str:
    """``path`` from the repository root where it lies inside it."""
    try:
        return str(Path(path).resolve().relative_to(DOCS.parent))
    except ValueError:
        return str(path)


def command() -> str:
    """The command line that runs this script, as a user would type it from the repository root."""
    return shlex.join(["python", relative(sys.argv[0]), *sys.argv[1:]])


def stamp(source: str, cmd: str | None = None, when: datetime.date | None = None, machine: dict | None = None,
          timed: bool = False) -> str:
    """The line under a table: which command wrote it, from which JSON, when, and on what machine;
    for a ``timed`` table on a busy machine, that its times are unreliable."""
    if machine is None:
        from nnforge.timing import machine as probe
        machine = probe()
    load = machine.get("load_average")
    busy = ""
    if timed and load:
        from nnforge.timing import busy as why_busy          # the rule the speed records and the demo use
        busy = why_busy({"cpus": machine.get("cpus"), "load_average": load})
    where = f"{machine.get('cpus')} CPUs ({machine.get('processor') or machine.get('machine')})"
    if machine.get("device"):
        where += f", {machine['device']}"
    if load:
        where += f", load average {' / '.join(f'{x:.1f}' for x in load)} (1 / 5 / 15 min)"
    day = (when or datetime.date.today()).isoformat()
    warning = (" The machine was busy with other work: compare the ratios within this table, not its "
               "milliseconds with another run's.") if busy else ""
    return f"Written by `{cmd or command()}` from `{relative(source)}` on {day}, {where}.{warning}"


def replace_block(text: str, name: str, body: str, where: str = "the page") -> str:
    """``text`` with the block of table ``name`` holding ``body``; everything outside the markers
    stays byte for byte. A page without the block gets it appended at its end."""
    start = begin(name)
    opens = [m.start() for m in re.finditer(re.escape(start), text)]
    if len(opens) > 1:
        raise ValueError(f"{where}: {start} appears {len(opens)} times; keep one block per table")
    block = f"{start}\n{body.rstrip()}\n{END}"
    if not opens:
        return text.rstrip("\n") + ("\n\n" if text.strip() else "") + block + "\n"
    close = text.find(END, opens[0])
    later = text.find("<!-- table:", opens[0] + len(start))
    if close < 0 or (0 <= later < close):
        line = text.count("\n", 0, opens[0]) + 1
        raise ValueError(f"{where}: {start} on line {line} has no {END} before the next table; close it")
    return text[:opens[0]] + block + text[close + len(END):]


def write(page: str | Path, name: str, columns, rows, *, source: str, notes=(), cmd: str | None = None,
          when: datetime.date | None = None, machine: dict | None = None, timed: bool = False) -> Path:
    """Replace table ``name`` in ``docs/<page>`` with ``rows`` under ``columns``, the ``notes``
    (one paragraph each) and the stamp (``timed``: its figures are times, which a busy machine
    makes unreliable). Returns the page's path."""
    path = Path(page) if Path(page).is_absolute() else DOCS / page
    body = "\n\n".join([markdown(columns, rows), *notes, stamp(source, cmd, when, machine, timed)])
    text = path.read_text() if path.exists() else f"# {path.stem}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(replace_block(text, name, body, where=str(path)))
    print(f"wrote table {name} in {path}")
    return path


def fmt(value, spec: str = ".4f", suffix: str = "") -> str | None:
    """``value`` formatted, or None (printed ``-``) when it was not measured."""
    return None if value is None else f"{value:{spec}}{suffix}"
