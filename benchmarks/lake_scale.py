"""Streaming against caching on the planted lake (>= 5 x 10^7 interactions, 10^6 items), local disk and S3.

  python jobs/generate.py --out /data/raw/scale --users 1060000 --items 1000000
  python jobs/prepare.py --input /data/raw/scale/interactions --items /data/raw/scale/items \
      --vocabulary catalogue --heldout 10000 --lake /data/lake --name scale
  python benchmarks/lake_scale.py --lake /data/lake --dataset scale        # raw output: lake_scale.json

One Ray Train worker (1 CPU; the other CPU is Ray Data's) per (storage, mode), all in one run:
- input only: users/s of two epochs through the run's own input path, `stream` (Ray Data every epoch,
  seeded shuffle buffer) and `cache` (epoch 1 reads the worker's share through Ray Data, epoch 2 permutes
  it in memory), and the worker's peak RSS after them;
- the training step at this M (MacridVAE K=7, D=100, sampled softmax, S=2,000 negatives, per-user
  candidates, B=500): users/s over 10 steps after 2 warm-up steps, fed from the same input, and the
  worker's peak RSS with the model;
- S3: the dataset version is copied to a moto server on loopback, started by this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time

import numpy as np

STEPS, WARMUP, BATCH, NEGATIVES = 10, 2, 500, 2000


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def worker_loop(config: dict) -> None:
    import ray.train
    import torch

    from macrid.data.batches import item_counts, load_meta
    from macrid.model.vae import MacridVAE
    from macrid.data.ray_data import CachedShard, stream_batches
    from macrid.model.row_sparse import Optimizers, tables_of
    from macrid.model.sampling import NegativeSampler
    from macrid.training.step import objective_for, train_step

    torch.set_num_threads(1)
    shard = ray.train.get_dataset_shard("train")
    mode, seed = config["mode"], 0
    source = CachedShard(shard, BATCH, seed, 0) if mode == "cache" else \
        (lambda epoch: stream_batches(shard, BATCH, seed, epoch, 0))
    rows = []
    for epoch in (1, 2):
        t0, users, first = time.perf_counter(), 0, None
        for idx, off in source(epoch):
            first = first if first is not None else time.perf_counter() - t0
            users += len(off) - 1
        seconds = time.perf_counter() - t0
        rows.append({"epoch": epoch, "seconds": seconds, "users": users, "users_per_s": users / seconds,
                     "first_batch_s": first})
    input_rss = rss_gb()
    meta = load_meta(config["lake"], config["dataset"])
    M = int(meta["n_items"])
    model = MacridVAE(M, K=7, D=100, row_sparse=True)
    tables = tables_of(model, True)
    opt = Optimizers(model, tables, "adam", 1e-3, 0.0)
    sampler = NegativeSampler(item_counts(config["lake"], config["dataset"]), NEGATIVES, 0.75, seed=0)
    times = []
    for i, (idx, off) in enumerate(source(3)):
        t0 = time.perf_counter()
        train_step(model, opt, tables, objective_for("user", sampler), idx, off, 0.2, 1)
        times.append(time.perf_counter() - t0)
        if i + 1 == WARMUP + STEPS:
            break
    step_s = float(np.median(times[WARMUP:]))
    with open(config["out"], "w") as f:
        json.dump({"epochs": rows, "input_peak_rss_gb": input_rss, "step_s": step_s,
                   "step_users_per_s": BATCH / step_s, "peak_rss_gb": rss_gb(), "items": M}, f)


def run(lake_root: str, dataset: str, mode: str, tmp: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from macrid.data.ray_data import train_dataset

    out = os.path.join(tmp, f"{mode}-{time.time_ns()}.json")
    TorchTrainer(worker_loop, train_loop_config={"mode": mode, "out": out, "lake": lake_root, "dataset": dataset},
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                 datasets={"train": train_dataset(lake_root, dataset)},
                 run_config=RunConfig(storage_path=tmp, name=f"{mode}-{time.time_ns()}")).fit()
    with open(out) as f:
        return json.load(f)


def to_s3(lake_root: str, dataset: str) -> str:
    """Copy the dataset's pointer and current version to a moto server on loopback; returns the S3 lake."""
    import boto3
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    from macrid.data import lake
    from macrid.data.batches import snapshot_uri

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_address[1]}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1")
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    src = snapshot_uri(lake_root, dataset)
    rel = os.path.relpath(src, lake_root)
    s3_fs, _ = lake.resolve("s3://bench/lake")
    for folder in ("items", "users", "train", "val", "test"):
        pafs.copy_files(f"{src}/{folder}", f"bench/lake/{rel}/{folder}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=s3_fs)
    lake.write_bytes(f"s3://bench/lake/{rel}/_meta.json", open(f"{src}/_meta.json", "rb").read())
    lake.write_bytes(f"s3://bench/lake/datasets/{dataset}/_meta.json", open(f"{src}/_meta.json", "rb").read())
    return "s3://bench/lake"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lake", required=True)
    p.add_argument("--dataset", default="scale")
    p.add_argument("--storage", nargs="+", default=["local", "s3"])
    p.add_argument("--out", default="benchmarks/lake_scale.json")
    args = p.parse_args()
    import ray

    from macrid.data.batches import load_meta

    lake_root = os.path.abspath(args.lake)
    meta = load_meta(lake_root, args.dataset)
    results = {"machine": f"{platform.machine()} {platform.processor()}, {os.cpu_count()} CPUs, "
                          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1024**3:.0f} GiB",
               "dataset": args.dataset, "train": meta["train"], "items": meta["n_items"], "rows": {}}
    roots = {}
    if "s3" in args.storage:
        roots["s3"] = to_s3(lake_root, args.dataset)  # before ray.init: workers inherit the environment
    if "local" in args.storage:
        roots["local"] = lake_root
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=1024**3)
    with tempfile.TemporaryDirectory() as tmp:
        for storage in args.storage:
            for mode in ("stream", "cache"):
                row = run(roots[storage], args.dataset, mode, tmp)
                results["rows"][f"{storage}-{mode}"] = row
                print(storage, mode, json.dumps(row), flush=True)
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
