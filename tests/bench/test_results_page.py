"""docs/benchmarks.md is a results page: short, and every result file it cites is in the tree; result files are
named by what they measure, not by when they were made."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "benchmarks.md"


def test_the_results_page_reads_in_five_minutes():
    assert len(PAGE.read_text().splitlines()) <= 250


def test_every_result_file_the_page_cites_exists():
    """Numbers come from files in the tree; a benchmark not run yet may name the file it will write, if it says so."""
    text = PAGE.read_text().split("## Not measured yet")[0]
    lines = [line for line in text.splitlines() if "not run yet" not in line]
    cited = set(re.findall(r"`([\w./-]+\.(?:json|txt))`", "\n".join(lines)))
    assert cited, "the page cites no result file"
    missing = [name for name in sorted(cited)
               if not any((ROOT / d / name).is_file() for d in ("bench/results", "bench/experiments/results", "."))]
    assert not missing, f"cited in docs/benchmarks.md but not in bench/results/: {missing}"


def test_no_file_is_named_by_a_work_period_or_call():
    dated = re.compile(r"_s\d+call\d+|session_?\d|_call\d", re.IGNORECASE)
    named = [str(p.relative_to(ROOT)) for d in ("bench", "docs", "examples", "src", "tests")
             for p in (ROOT / d).rglob("*") if dated.search(p.name) and "__pycache__" not in p.parts]
    assert not named, named
