"""Training throughput by input mode on one dataset: memory, cache and stream, with 1 and 2 Ray Train
workers, all measured in one run on one machine (the rows being compared come from the same run).

  python benchmarks/throughput.py --lake lake --dataset ml-1m --epochs 5     # raw output: throughput.json

For each setup: steady-state users/s (median over epochs 2..E), the first epoch's time, the time
the loop spent blocked on input per epoch (`input_seconds`), and the per-epoch fixed cost of
streaming = median epoch time of "stream" minus that of "memory" at the same worker count.
Threads are the same for every mode at a given worker count (2 for one worker, 1 each for two),
so that only the input differs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from macrid.config import load_config
from macrid.training.launch import launch
from macrid.data.ray_data import DATA_RESERVE_CPUS

CPUS = 2


def summary(metrics: dict) -> dict:
    rows = metrics["history"][1:] or metrics["history"]  # the first epoch warms up (and fills the cache)
    return {"users_per_s": float(np.median([r["users"] / r["seconds"] for r in rows])),
            "median_epoch_s": float(np.median([r["seconds"] for r in rows])),
            "first_epoch_s": metrics["history"][0]["seconds"],
            "median_input_s": float(np.median([r["input_seconds"] for r in rows]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lake", default="lake")
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--out", default="benchmarks/throughput.json")
    args = p.parse_args()
    import ray

    stamp = time.strftime("%H%M%S")
    base = [f"data.lake={os.path.abspath(args.lake)!r}", f"data.dataset={args.dataset!r}", f"optim.epochs={args.epochs}",
            "run.progress=false"]
    ray.init(num_cpus=CPUS, include_dashboard=False, object_store_memory=256 * 1024**2)
    results = {"machine": f"{platform.machine()} {platform.processor()}, {os.cpu_count()} CPUs",
               "dataset": args.dataset, "epochs": args.epochs, "rows": {}}
    for workers in (1, 2):
        for data in ("memory", "cache", "stream"):
            data_cpus = 0.0 if data == "memory" else DATA_RESERVE_CPUS  # left for Ray Data's tasks
            m = launch(load_config(None, base + [
                f"run.name='bench-{data}{workers}-{stamp}'", f"run.num_workers={workers}", f"run.data={data!r}",
                f"run.cpus_per_worker={(CPUS - data_cpus) / workers}", f"run.threads={CPUS // workers}"]))
            results["rows"][f"{data}-{workers}"] = summary(m)
            print(data, workers, results["rows"][f"{data}-{workers}"], flush=True)
        mem = results["rows"][f"memory-{workers}"]
        for data in ("cache", "stream"):
            row = results["rows"][f"{data}-{workers}"]
            row["ratio_to_memory"] = row["users_per_s"] / mem["users_per_s"]
            row["fixed_cost_per_epoch_s"] = row["median_epoch_s"] - mem["median_epoch_s"]
    ray.shutdown()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
