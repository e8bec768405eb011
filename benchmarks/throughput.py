"""Training throughput (users/s per epoch) on ML-1M: the single-process loop against Ray Train with
1 and 2 CPU workers (DDP, gloo), with in-memory and with Ray Data input, measured in one run.

  python benchmarks/throughput.py --lake lake --dataset ml-1m --epochs 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from macrid.config import load_config
from macrid.launch import launch, prepare_config
from macrid.train import run_in_process


def users_per_second(metrics: dict) -> float:
    rows = metrics["history"][1:] or metrics["history"]  # the first epoch warms up
    return float(np.median([r["users"] / r["seconds"] for r in rows]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lake", default="lake")
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--epochs", type=int, default=4)
    args = p.parse_args()
    import ray

    stamp = time.strftime("%H%M%S")
    base = [f"data.lake={os.path.abspath(args.lake)!r}", f"data.dataset={args.dataset!r}", f"optim.epochs={args.epochs}",
            "run.progress=false"]
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "dataset": args.dataset}
    cfg = prepare_config(load_config(None, base + [f"run.name='bench-local-{stamp}'", "run.threads=2"]))
    results["single_process_users_per_s"] = users_per_second(run_in_process(cfg))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=256 * 1024**2)
    for data in ("memory", "ray"):
        for workers in (1, 2):
            m = launch(load_config(None, base + [f"run.name='bench-{data}{workers}-{stamp}'",
                                                 f"run.num_workers={workers}", f"run.data={data!r}"]))
            key = f"ray_train_{data}_input_{workers}_workers"
            results[f"{key}_users_per_s"] = users_per_second(m)
            results[f"{key}_ratio_to_single_process"] = (
                results[f"{key}_users_per_s"] / results["single_process_users_per_s"])
    ray.shutdown()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
