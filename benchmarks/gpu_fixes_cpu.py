"""What the GPU fixes of issue 22 change where a CPU can see it: each new piece against its previous version
(the code at commit 62ac11b, loaded from git), same inputs, same run, median of repeats.

    python benchmarks/gpu_fixes_cpu.py --threads 2        # writes benchmarks/gpu_fixes_cpu.json

On a CPU a host sync costs nothing, so what shows here is work removed (passes, copies), not syncs saved;
the sync counts are what benchmarks/gpu.py --check measures on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import types

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import _median_time as median_time  # noqa: E402  (one warm-up call, then the median of repeats)

BASELINE = "62ac11b"


def old_module(path: str, name: str) -> types.ModuleType:
    src = subprocess.run(["git", "show", f"{BASELINE}:{path}"], capture_output=True, text=True, check=True).stdout
    mod = types.ModuleType(name)
    exec(compile(src, f"{BASELINE}:{path}", "exec"), mod.__dict__)
    return mod


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "gpu_fixes_cpu.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from macrid.config import ModelConfig
    from macrid.model.sampling import NegativeSampler
    from macrid.model.vae import build_model
    from macrid.training import evaluate as new_eval

    old_eval = old_module("macrid/training/evaluate.py", "old_evaluate")
    old_sampling = old_module("macrid/model/sampling.py", "old_sampling")
    rows = []
    g = torch.Generator().manual_seed(0)
    # 1. chunked top-k: 1,000 users, 50,000 items, K = 7, D = 100, ~60 fold-in items each, 4 chunks
    M, B = 50_000, 1000
    model = build_model(ModelConfig(K=7, D=100), M).eval()
    lengths = torch.randint(20, 100, (B,), generator=g)
    off = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    idx = torch.randint(0, M, (int(off[-1]),), generator=g)
    with torch.no_grad():
        for label, fn in (("before", old_eval.chunked_top_k), ("after", new_eval.chunked_top_k)):
            rows.append({"part": "chunked_top_k (1,000 users x 50,000 items, chunk 12,500)", "version": label,
                         "seconds": median_time(lambda fn=fn: fn(model, idx, off, M, 100, chunk=12_500), 5)})
    # 2. MultVAE represent: the encoder only, not the (B, M) decoder
    mult = build_model(ModelConfig(name="multvae", D=100, hidden=600), M).eval()
    with torch.no_grad():
        rows.append({"part": "MultVAE represent (1,000 users, 50,000 items)", "version": "before",
                     "seconds": median_time(lambda: mult.score_all(idx, off).mu)})
        rows.append({"part": "MultVAE represent (1,000 users, 50,000 items)", "version": "after",
                     "seconds": median_time(lambda: mult.represent(idx, off))})
    # 3. the sampled step's candidate draw: 10^6 items, S = 8,192, 40,000 batch items
    counts = np.random.default_rng(0).zipf(1.5, 1_000_000).astype(np.float64)
    batch_items = torch.randint(0, 1_000_000, (40_000,), generator=g)
    for label, cls in (("before", old_sampling.NegativeSampler), ("after", NegativeSampler)):
        sampler = cls(counts, 8192, 0.75, seed=0)
        rows.append({"part": "candidate draw (10^6 items, S = 8,192, 40,000 batch items)", "version": label,
                     "seconds": median_time(lambda s=sampler: s.candidates(batch_items))})
    # 4. the EMA's per-step update, 10^6 items x D = 100, a step touching 40,000 rows of h and of t
    from macrid.model.row_sparse import Optimizers, tables_of
    from macrid.training.averaging import WeightAverage

    big = build_model(ModelConfig(K=7, D=100), 1_000_000, row_sparse=True)
    tables = tables_of(big, True)
    opt = Optimizers(big, tables, "adam", 1e-3, 0.0)
    touched = torch.randint(0, 1_000_000, (40_000,), generator=g)
    for p in tables:  # the sparse gradient a sampled step leaves: its rows are the rows the optimizer changes
        p.grad = torch.sparse_coo_tensor(touched.unsqueeze(0), torch.zeros(40_000, 100), p.shape, check_invariants=False)
    averaged = torch.optim.swa_utils.AveragedModel(big, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999))
    averaged.update_parameters(big)  # past the first update, which copies
    lazy = WeightAverage(big, 0.999, tables, [])
    lazy.update(big)

    def lazy_step():
        lazy._before_step(opt.parts[1], (), {})  # what SparseAdam's pre-step hook does
        lazy.update(big)
    part = "EMA update per step (10^6 x 100 tables, 40,000 rows touched)"
    rows.append({"part": part, "version": "before", "seconds": median_time(lambda: averaged.update_parameters(big))})
    rows.append({"part": part, "version": "after", "seconds": median_time(lazy_step)})
    by_part: dict = {}
    for r in rows:
        by_part.setdefault(r["part"], {})[r["version"]] = r["seconds"]
    for part, t in by_part.items():
        print(f"{part:62s} before {1000 * t['before']:8.1f} ms  after {1000 * t['after']:8.1f} ms  "
              f"ratio {t['after'] / t['before']:.2f}")
    with open(args.out, "w") as f:
        json.dump({"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                               "torch": torch.__version__}, "baseline": BASELINE,
                   "command": " ".join(sys.argv), "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
