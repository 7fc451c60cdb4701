"""benchmarks/docs_table.py: the writer of docs/ tables replaces exactly the marked block."""
from __future__ import annotations

import datetime
import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "docs_table.py"
_spec = importlib.util.spec_from_file_location("docs_table", _PATH)
docs_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docs_table)

MACHINE = {"cpus": 2, "processor": "x86_64", "load_average": [1.0, 0.5, 0.25]}
PAGE = """# Measured

Prose before, with a figure quoted by hand: 0.99.

<!-- table:spmm -->
| old | table |
|---|---|
| 1 | 2 |

Written by an older run.
<!-- /table -->

Prose between.

<!-- table:other -->
| keep | me |
<!-- /table -->
trailing text without a newline"""


def test_replaces_exactly_the_marked_block(tmp_path):
    page = tmp_path / "spmm.md"
    page.write_text(PAGE)
    docs_table.write(page, "spmm", ["K x N", "70%"], [["768 x 768", "2.82x"], ["3072 x 768", None]],
                     source="benchmarks/out/spmm.json", notes=["A note."], cmd="python benchmarks/spmm.py --m 1",
                     when=datetime.date(2026, 12, 6), machine=MACHINE)
    text = page.read_text()
    before, rest = PAGE.split("<!-- table:spmm -->")
    after = rest.split("<!-- /table -->", 1)[1]
    assert text.startswith(before) and text.endswith(after)
    block = text[len(before):len(text) - len(after)]
    assert block == ("<!-- table:spmm -->\n| K x N | 70% |\n|---|---|\n| 768 x 768 | 2.82x |\n| 3072 x 768 | - |\n\n"
                     "A note.\n\nWritten by `python benchmarks/spmm.py --m 1` from `benchmarks/out/spmm.json` on "
                     "2026-12-06, 2 CPUs (x86_64), load average 1.0 / 0.5 / 0.2 (1 / 5 / 15 min).\n"
                     "<!-- /table -->")
    # writing again gives the same page: the markers survive and nothing accumulates
    docs_table.write(page, "spmm", ["K x N", "70%"], [["768 x 768", "2.82x"], ["3072 x 768", None]],
                     source="benchmarks/out/spmm.json", notes=["A note."], cmd="python benchmarks/spmm.py --m 1",
                     when=datetime.date(2026, 12, 6), machine=MACHINE)
    assert page.read_text() == text


def test_missing_block_is_appended_and_missing_page_created(tmp_path):
    page = tmp_path / "new.md"
    docs_table.write(page, "fresh", ["a"], [[1]], source="x.json", cmd="python x.py",
                     when=datetime.date(2026, 1, 2), machine=MACHINE)
    text = page.read_text()
    assert text.startswith("# new\n\n<!-- table:fresh -->\n| a |\n|---|\n| 1 |\n")
    assert text.endswith("<!-- /table -->\n")
    docs_table.write(page, "second", ["b"], [[2]], source="y.json", cmd="python y.py", machine=MACHINE)
    assert page.read_text().startswith(text.rstrip("\n") + "\n\n<!-- table:second -->")


def test_unclosed_or_repeated_block_is_refused_naming_the_page(tmp_path):
    unclosed = "a\n<!-- table:t -->\n| x |\n<!-- table:u -->\n<!-- /table -->\n"
    with pytest.raises(ValueError, match=r"p\.md: <!-- table:t --> on line 2 has no <!-- /table -->"):
        docs_table.replace_block(unclosed, "t", "body", where="p.md")
    twice = "<!-- table:t -->\n<!-- /table -->\n<!-- table:t -->\n<!-- /table -->\n"
    with pytest.raises(ValueError, match="appears 2 times"):
        docs_table.replace_block(twice, "t", "body", where="p.md")


def test_cells_are_escaped_and_command_is_relative():
    assert docs_table.markdown(["a|b"], [["x\ny"]]) == "| a\\|b |\n|---|\n| x y |"
    assert docs_table.command().startswith("python ")


def test_a_timed_table_from_a_busy_machine_says_so():
    busy = {"cpus": 2, "processor": "x86_64", "load_average": [5.6, 5.3, 4.7]}
    quiet = {"cpus": 2, "processor": "x86_64", "load_average": [1.0, 1.0, 1.0]}
    day = datetime.date(2026, 12, 6)
    assert "busy with other work" in docs_table.stamp("x.json", "python x.py", day, busy, timed=True)
    assert "busy" not in docs_table.stamp("x.json", "python x.py", day, busy, timed=False)
    assert "busy" not in docs_table.stamp("x.json", "python x.py", day, quiet, timed=True)
