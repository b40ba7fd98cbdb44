"""benchmarks/inference.py runs: the refinement cases on the demo model, at a tiny budget."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_refinement_cases_print_a_row_each():
    res = subprocess.run(
        [sys.executable, "benchmarks/inference.py", "--models", "demo", "--batch", "1",
         "--repeats", "1", "--threads", "1", "--refine-steps", "2", "--cases", "refine"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split() for line in res.stdout.splitlines() if line.startswith("demo")]
    assert [r[2] for r in rows] == ["refine", "refine+photo"]
    assert all(r[1] == "cpu" and r[3] == "1" for r in rows)
