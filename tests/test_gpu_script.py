"""benchmarks/gpu_13b.py (the GPU check) runs end to end on CPU in its --smoke mode: one table row
per (budget, storage) case, each case placed and run without an error, and the doc markers filled."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_13b.py"


def test_smoke_run_writes_one_row_per_case(tmp_path):
    doc = tmp_path / "memory.md"
    doc.write_text("before\n<!-- bench:gpu-13b -->\nold\n<!-- /bench:gpu-13b -->\nafter\n")
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--update-doc", str(doc)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ") and " GB | " in line]
    cases = {(cells[1].strip(), cells[2].strip()) for cells in (r.split("|") for r in table)}
    assert cases == {(f"{gb} GB", s) for gb in (6, 12, 24) for s in ("bf16", "fp8")}
    assert not any("OOM" in r or "error" in r for r in table)
    assert any("offload" in r or "disk" in r for r in table)  # the smoke run exercises block offload
    text = doc.read_text()
    assert "old" not in text and text.startswith("before") and text.endswith("after\n")
    assert all(r in text for r in table)


def test_without_cuda_the_full_run_is_a_one_line_error():
    done = subprocess.run([sys.executable, str(SCRIPT)], check=False, capture_output=True, text=True, timeout=60,
                          env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""})
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "Traceback" not in done.stderr
