"""The figures benchmarks/faults.md sets beside tests/test_multinode.py's fault runs, on the same kind of cluster
(a head without CPUs and 2-CPU worker nodes on this machine, the lake on a local S3 server):

1. each fault scenario's run uninterrupted, same config and seed: its final validation NDCG@100;
2. users/s of 2 workers on 2 nodes against 1 worker on 1 node, ML-1M-sized planted data
   (6,040 users x 3,706 items, about 10^6 interactions), both rows in the same run.

    python benchmarks/faults.py                 # writes benchmarks/faults.json

On a 2-vCPU machine every "node" shares the same two cores, so the second figure measures the cost of the
distribution (DDP over gloo, Ray Data's split), not a speed-up; on real nodes each adds its own CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LAKE = "s3://lake/faults-bench"
COMMON = ["data.dataset='syn'", "model.K=4", "model.D=16", "optim.batch_size=100", "run.progress=false"]
# the uninterrupted twins of tests/test_multinode.py's fault runs (same config, same seed)
SCENARIOS = {
    "node loss, fixed 2 workers": ["optim.epochs=8", "run.num_workers=2", "run.placement='SPREAD'",
                                   "run.cpus_per_worker=1", "run.data='stream'"],
    "elastic 1-2 workers": ["optim.epochs=15", "run.num_workers=2", "run.cpus_per_worker=2", "run.data='memory'"],
    "cluster loss": ["optim.epochs=5", "run.num_workers=2", "run.placement='SPREAD'", "run.cpus_per_worker=1",
                     "run.data='memory'"],
}


def s3_server() -> subprocess.Popen:
    """benchmarks/prepare.py's local moto server, with the AWS environment pointed at it and the bucket made."""
    from prepare import s3_server as start

    server, endpoint = start()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1")
    import boto3

    boto3.client("s3").create_bucket(Bucket="lake")
    return server


def cluster(workers: int):
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 200 << 20,
                                                     "include_dashboard": False})
    for _ in range(workers):
        c.add_node(num_cpus=2, object_store_memory=200 << 20)
    c.wait_for_nodes()
    return c


def train(address: str, sets: list[str]) -> dict:
    """jobs/train.py as a driver joined to the cluster; returns its metrics.json."""
    import boto3

    run = next(s.split("=", 1)[1].strip("'") for s in sets if s.startswith("run.name="))
    args = [sys.executable, os.path.join(os.path.dirname(__file__), "..", "jobs", "train.py"), "--lake", LAKE]
    for kv in sets:
        args += ["--set", kv]
    done = subprocess.run(args, env=os.environ | {"RAY_ADDRESS": address}, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"training {run} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    key = f"{LAKE.removeprefix('s3://lake/')}/runs/{run}/metrics.json"
    return json.loads(boto3.client("s3").get_object(Bucket="lake", Key=key)["Body"].read())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "faults.json"))
    p.add_argument("--epochs", type=int, default=3, help="epochs of each users/s row (the first is not counted)")
    p.add_argument("--repeats", type=int, default=2, help="uninterrupted runs per scenario (same seed each time)")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from macrid.data.prepare import prepare
    from macrid.data.split import Protocol
    from macrid.data.synthetic import SyntheticSpec, generate

    server = s3_server()
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
           "command": " ".join(sys.argv), "baselines": {}, "throughput": {}}
    try:
        prepare(generate(SyntheticSpec(n_users=600, n_items=200, K=4, seed=3)), LAKE, "syn", Protocol())
        # ML-1M-sized: 6,040 users x 3,706 items, ~165 items per user (about 10^6 interactions)
        prepare(generate(SyntheticSpec(n_users=6040, n_items=3706, K=7, mean_items=165, max_items=1000, seed=1)),
                LAKE, "ml1m-size", Protocol())
        c = cluster(2)
        try:
            for name, sets in SCENARIOS.items():  # repeated: how far two uninterrupted runs differ is the noise
                scores = out["baselines"][name] = []
                for r in range(args.repeats):
                    m = train(c.address, COMMON + sets + [f"run.name='base-{len(out['baselines'])}-{r}'"])
                    scores.append(m["history"][-1].get("val_ndcg@100"))
                print(f"{name:30s} uninterrupted: final val ndcg@100 {', '.join(f'{v:.4f}' for v in scores)}",
                      flush=True)
            big = ["data.dataset='ml1m-size'", "optim.batch_size=500", "run.progress=false", "run.eval_every=1000",
                   f"optim.epochs={args.epochs}", "run.cpus_per_worker=2", "run.data='memory'"]
            for label, extra in (("1 worker, 1 node", ["run.num_workers=1"]),
                                 ("2 workers, 2 nodes", ["run.num_workers=2", "run.placement='SPREAD'"])):
                m = train(c.address, big + extra + [f"run.name='tp-{len(out['throughput'])}'"])
                epochs = m["history"][1:] or m["history"]
                ups = sum(h["users"] for h in epochs) / sum(h["seconds"] for h in epochs)
                out["throughput"][label] = ups
                print(f"{label:30s} {ups:10.0f} users/s (epochs 2..{args.epochs})", flush=True)
            t = out["throughput"]
            out["ratio_2_nodes_over_1"] = t["2 workers, 2 nodes"] / t["1 worker, 1 node"]
            print(f"2 nodes / 1 node: {out['ratio_2_nodes_over_1']:.2f}")
        finally:
            c.shutdown()
    finally:
        server.terminate()
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
