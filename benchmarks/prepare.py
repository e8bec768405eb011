"""Lake-scale prepare: wall time, interactions/s and memory at 10^7 to 2 x 10^8 interactions (issue 21).

  python jobs/generate.py --out /data/raw/p1e7 --users 210000 --items 1000000      # 1.0 x 10^7
  python jobs/generate.py --out /data/raw/p5e7 --users 1050000 --items 1000000     # 5.0 x 10^7
  python jobs/generate.py --out /data/raw/p2e8 --users 4200000 --items 1000000     # 2.0 x 10^8
  git worktree add /tmp/macrid-inmemory 95b41c4                                   # today's in-memory path
  python benchmarks/prepare.py --raw /data/raw --baseline-tree /tmp/macrid-inmemory   # -> prepare.json

Every row is one `prepare` of `<raw>/<lake>/interactions` with `--items <raw>/<lake>/items --vocabulary
catalogue --heldout 10000`, each in its own process tree, all in one run of this script:
- `ray`: this project's prepare on a local Ray it starts (the driver is `--one`, below);
- `ray-s3`: the same with the input and the lake on a moto S3 server on loopback (started here);
- `ray-2-nodes-s3`: a 2-node Ray cluster on this machine (ray.cluster_utils: a head without CPUs and two
  1-CPU raylets), input and lake on the S3 server;
- `in-memory`: `jobs/prepare.py` of the commit before this one (one polars frame in one process).

Memory is sampled every 0.25 s from /proc: the PSS of the whole process tree (driver, Ray's GCS, raylet,
workers and the object store's shared pages, each counted once) and each process's peak RSS (VmHWM). Bytes
spilled are Ray's object-spilling counter; the shuffle itself goes through the lake's `_scratch/`, whose
peak size (local lakes) is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except OSError:
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def hwm_kb(pid: int) -> tuple[str, int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return fields["Name"].strip(), int(fields.get("VmHWM", "0 kB").split()[0])
    except (OSError, KeyError):
        return "", 0


def dir_bytes(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(d, f))
            except OSError:
                pass
    return total


def measure(cmd: list[str], env: dict, scratch: str | None = None) -> dict:
    """Run cmd; sample its tree's PSS, every process's peak RSS and the scratch folder's size."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"tree_pss_kb": 0, "driver_hwm_kb": 0, "process_hwm_kb": 0, "process": "", "scratch_bytes": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            pids = tree(proc.pid)
            peak["tree_pss_kb"] = max(peak["tree_pss_kb"], sum(pss_kb(p) for p in pids))
            for p in pids:
                name, hwm = hwm_kb(p)
                if p == proc.pid:
                    peak["driver_hwm_kb"] = max(peak["driver_hwm_kb"], hwm)
                elif hwm > peak["process_hwm_kb"]:
                    peak["process_hwm_kb"], peak["process"] = hwm, name
            if scratch and os.path.isdir(scratch):
                peak["scratch_bytes"] = max(peak["scratch_bytes"], dir_bytes(scratch))
            stop.wait(0.25)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    stop.set()
    thread.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{err[-4000:]}")
    gb = 1024**2
    return {"wall_s": round(wall, 1), "tree_pss_gb": round(peak["tree_pss_kb"] / gb, 2),
            "driver_peak_gb": round(peak["driver_hwm_kb"] / gb, 2),
            "largest_other_process_peak_gb": round(peak["process_hwm_kb"] / gb, 2),
            "largest_other_process": peak["process"], "scratch_peak_gb": round(peak["scratch_bytes"] / 1024**3, 2),
            "stdout": out}


def one(args: argparse.Namespace) -> int:
    """The driver of one `ray` row: prepare on Ray, then print the stages' timings, Ray's spill counter and
    the largest stage's ds.stats() as JSON."""
    import ray

    from macrid.cluster import connect
    from macrid.data.prepare import prepare
    from macrid.data.raw_input import Source
    from macrid.data.readers import read_items
    from macrid.data.split import Protocol
    from macrid.data.stages import Stages

    cluster = None
    if args.nodes > 1:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                               "object_store_memory": 256 << 20})
        for _ in range(args.nodes):
            cluster.add_node(num_cpus=1, object_store_memory=256 << 20)
        ray.init(address=cluster.address, configure_logging=False)
        cluster.wait_for_nodes()
    else:
        connect(dashboard=False)
    t0 = time.perf_counter()
    stages = Stages("ray", "prepare")
    meta = prepare([Source(args.input)], args.lake, "bench", Protocol(heldout=10000, vocabulary="catalogue"),
                   items=read_items(args.items), stages=stages)
    seconds = time.perf_counter() - t0
    from ray._private.internal_api import memory_summary

    summary = memory_summary(stats_only=True)
    spilled = next((line for line in summary.splitlines() if "Spilled" in line), "Spilled 0 MiB")
    biggest = max(range(len(stages.stats)), key=lambda i: list(stages.seconds.values())[i])
    print(json.dumps({"prepare_s": round(seconds, 1), "stages_s": {k: round(v, 1) for k, v in stages.seconds.items()},
                      "nodes": {k: len(v) for k, v in stages.nodes.items()}, "spilled": spilled.strip(),
                      "interactions": meta["input"]["rows"], "n_users": meta["n_users"], "n_items": meta["n_items"],
                      "partitions": meta["input"]["partitions"], "stats_largest_stage": stages.stats[biggest],
                      "stats_all": stages.stats}), flush=True)
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()  # its raylets are this process's children: stop them before exiting
    return 0


def s3_server() -> tuple[subprocess.Popen, str]:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.05)
    return server, endpoint


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", default="/data/raw", help="folder holding p1e7/, p5e7/, p2e8/ from jobs/generate.py")
    p.add_argument("--baseline-tree", help="a worktree of the commit before Ray Data prepare (in-memory rows)")
    p.add_argument("--work", default=None, help="scratch folder for the lakes (default: a temporary one)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "prepare.json"))
    p.add_argument("--only", nargs="*", help="row names to run (default all)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--input"), p.add_argument("--items"), p.add_argument("--lake")
    p.add_argument("--nodes", type=int, default=1)
    args = p.parse_args()
    if args.one:
        return one(args)

    work = args.work or tempfile.mkdtemp(prefix="macrid-prepare-bench-")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    rows = json.load(open(args.out))["rows"] if args.only and os.path.exists(args.out) else []
    plan = [("in-memory", "p1e7"), ("ray", "p1e7"), ("in-memory", "p5e7"), ("ray", "p5e7"), ("ray", "p2e8"),
            ("ray-s3", "p5e7"), ("ray-2-nodes-s3", "p5e7")]
    server = None
    for kind, data in plan:
        name = f"{kind}:{data}"
        if args.only and name not in args.only:
            continue
        raw = os.path.join(args.raw, data)
        with open(os.path.join(raw, "_manifest.json")) as f:
            interactions = json.load(f)["interactions"]
        lake_dir = os.path.join(work, f"lake-{kind}-{data}")
        shutil.rmtree(lake_dir, ignore_errors=True)
        run_env, inp, items, lake_root = env, f"{raw}/interactions", f"{raw}/items", lake_dir
        if kind == "in-memory":
            if not args.baseline_tree:
                continue
            cmd = [sys.executable, os.path.join(args.baseline_tree, "jobs", "prepare.py"), "--input", inp, "--items",
                   items, "--vocabulary", "catalogue", "--heldout", "10000", "--lake", lake_dir, "--name", "bench"]
            run_env = env | {"PYTHONPATH": args.baseline_tree}
        else:
            if kind.endswith("s3"):
                if server is None:
                    server, endpoint = s3_server()
                    s3env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                             "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
                    os.environ.update(s3env)
                    import boto3

                    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
                    from macrid.data import lake

                    t0 = time.perf_counter()
                    for sub in ("interactions", "items"):
                        for fname in sorted(os.listdir(os.path.join(raw, sub))):
                            with open(os.path.join(raw, sub, fname), "rb") as f:
                                lake.write_bytes(f"s3://bench/raw/{data}/{sub}/{fname}", f.read())
                    print(f"uploaded {data} to the S3 server in {time.perf_counter() - t0:.0f} s", flush=True)
                run_env = env | s3env
                inp, items = f"s3://bench/raw/{data}/interactions", f"s3://bench/raw/{data}/items"
                lake_root = f"s3://bench/{kind}"
            cmd = [sys.executable, os.path.abspath(__file__), "--one", "--input", inp, "--items", items, "--lake",
                   lake_root, "--nodes", "2" if "2-nodes" in kind else "1"]
        print(f"{name}: {interactions:,} interactions ...", flush=True)
        try:
            r = measure(cmd, run_env, scratch=os.path.join(lake_dir, "_scratch") if lake_root == lake_dir else None)
        except RuntimeError as e:
            print(str(e)[-20000:], flush=True)
            rows = [x for x in rows if x["row"] != name] + [{"row": name, "failed": str(e)[-3000:]}]
            save(args.out, rows)
            continue
        out = r.pop("stdout")
        if kind != "in-memory":
            r |= json.loads(out[out.rindex('{"prepare_s"'):])
        r |= {"row": name, "interactions": interactions,
              "interactions_per_s": round(interactions / r["wall_s"]),
              "ns_per_interaction": round(r["wall_s"] / interactions * 1e9, 1)}
        print(json.dumps({k: v for k, v in r.items() if not k.startswith("stats")}), flush=True)
        rows = [x for x in rows if x["row"] != name] + [r]
        save(args.out, rows)
        shutil.rmtree(lake_dir, ignore_errors=True)
    if server is not None:
        server.terminate()
    print(f"wrote {args.out}")
    return 0


def save(path: str, rows: list[dict]) -> None:
    """The rows so far (a re-run with --only replaces its rows and keeps the others)."""
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                         f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1024**3:.0f} GiB",
              "python": platform.python_version(), "rows": rows}
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
