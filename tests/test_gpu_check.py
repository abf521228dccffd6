"""The GPU check script runs on this CPU machine in --dry-run, so it cannot rot before a GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_reports_every_part(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    parts = {p["name"]: p for p in report["parts"]}
    assert report["dry_run"] and len(parts) == 10
    assert all(p["status"] in ("passed", "skipped") for p in parts.values()), parts
    # the CPU-capable halves ran: the CUDA tests import, the export reconstructs, the parity recipe exists
    assert parts["environment"]["status"] == "passed" and "torch" in parts["environment"]["figures"]
    assert "tests collected" in parts["CUDA tests"]["figures"]["collected (dry run)"]
    assert parts["TensorRT engines, backend, parity"]["figures"] == {"recipe (dry run)": "True"}
    assert parts["TensorRT generator (device-resident)"]["figures"] == {"velocity recipe checked on ONNX Runtime (dry run)": True}
    assert parts["benchmark: splat CUDA vs dense"]["figures"]["speed_up"] > 1
    # every skip says why; the summary and the Markdown report name every part
    assert all(p["reason"] for p in parts.values() if p["status"] == "skipped")
    markdown = (out / "report.md").read_text()
    assert all(name in markdown and name in proc.stdout for name in parts)
