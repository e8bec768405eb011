"""benchmarks/gpu.py must keep working, and keep running on a bare GPU image (torch, numpy, pyarrow only)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECK = """
import runpy, sys
sys.argv = ["gpu.py", "--smoke", "--check", "--shapes", "ml20m", "1m-items", "--precisions", "fp32", "bf16", "--out", sys.argv[1]]
try:
    runpy.run_path("benchmarks/gpu.py", run_name="__main__")
except SystemExit as e:
    assert e.code == 0, e.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "polars", "boto3", "matplotlib"))
assert not heavy, heavy
"""


def test_gpu_benchmark_smoke_runs_without_ray_polars_or_boto3(tmp_path):
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, "-c", CHECK, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads(out.read_text())["results"]
    assert {(r["shape"], r["precision"]) for r in rows} == {(s, p) for s in ("ml20m", "1m-items")
                                                            for p in ("fp32", "bf16")}
    assert all(r["train_users_per_s"] > 0 and r["eval_users_per_s"] > 0 for r in rows)
    assert "[FAIL]" not in run.stdout and run.stdout.count("[PASS]") >= 10  # the --check lines ran first
    assert all(r["final_loss"] == r["final_loss"] and "eval_peak_gpu_gib" in r for r in rows)
