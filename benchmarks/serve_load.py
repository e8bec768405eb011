"""Load on the live steering service: latency and requests/s at 1, 8 and 32 clients, memory over a long run.

  python benchmarks/serve_load.py --lake /tmp/modebench/lake --run mode-ml-1m --label ml-1m \
      --lake /tmp/servebench/lake --run planted --label planted-1e5 --soak 300 --baseline
      (pairs: --lake L --run R --label NAME, one per model; raw output: serve.json, the table: serve.md)

Per model, `jobs/serve.py` is started as users start it (one replica, 1 CPU, a Ray of its own under a fresh
RAY_TMPDIR) and driven over loopback by a bounded asyncio client (aiohttp, one connection per client):
each level sends exactly --requests requests of `POST /recommend` with a 20-item session (items drawn at
random from the run's vocabulary, a fixed seed) and top_n 100, from C = 1, 8, 32 concurrent clients,
  - "fixed":   the same concept weights (none) on every request,
  - "steered": new concept weights on every request (each concept's weight drawn from {0, 0.5, 1, 2}).
Reported: p50 / p99 latency as the client saw it, requests/s, and every non-200 answer (the target is none).

The cost against the scoring's matmul bound, in the same run: `Steering.recommend` (the service's own
answer: checks, Eq. 7, scores, top-N, titles) timed in this process on the same bodies with one thread,
and `torch.mm` of the scoring's shape, (M x D) by (D x K), timed the same way: the bound is that matmul's
time. The HTTP path adds Ray Serve's proxy and the JSON both ways.

Baseline: with --baseline, the first model's levels are measured again under Ray Serve's own defaults
(max_ongoing_requests 5, no RAY_SERVE_THROUGHPUT_OPTIMIZED) in the same run, for the ratio.

Memory: with --soak S, the first model is also driven for S seconds at 8 clients with steered requests,
and the replica's resident memory (VmRSS of the `ServeReplica` process, Linux /proc) is sampled every 5 s;
the growth from the first minute's mean to the last minute's mean is reported.

The client shares this machine's CPUs with the service (on the 2-core development VM it takes a large share),
so these figures are a floor for what one replica does when the clients are elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import torch

from macrid.output.steering import Steering

ROOT = Path(__file__).resolve().parents[1]
SESSION_ITEMS, TOP_N, CLIENTS = 20, 100, (1, 8, 32)
WEIGHT_CHOICES = (0.0, 0.5, 1.0, 2.0)


def bodies(core: Steering, n: int, steered: bool, seed: int) -> list[bytes]:
    """n request bodies: a 20-item session each, top_n 100, and (steered) a fresh weight for every concept."""
    rng = random.Random(seed)
    ids = core.item_ids
    out = []
    for _ in range(n):
        body = {"items": [str(i) for i in rng.sample(ids, SESSION_ITEMS)], "top_n": TOP_N}
        if steered:
            body["weights"] = {str(k): rng.choice(WEIGHT_CHOICES) for k in range(core.info.K)}
        out.append(json.dumps(body).encode())
    return out


async def drive(url: str, payloads: list[bytes], clients: int) -> dict:
    """Send every payload once from `clients` concurrent clients; latency per request as the client saw it."""
    latencies, statuses, queue = [], {}, list(reversed(payloads))
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, headers={"content-type": "application/json"}) as session:
        async def client():
            while queue:
                body = queue.pop()
                t0 = time.perf_counter()
                async with session.post(url, data=body) as r:
                    await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    ms = sorted(x * 1e3 for x in latencies)
    return {"clients": clients, "requests": len(ms), "seconds": round(wall, 2),
            "requests_per_s": round(len(ms) / wall, 1), "p50_ms": round(_quantile(ms, 0.50), 2),
            "p99_ms": round(_quantile(ms, 0.99), 2), "errors": sum(v for k, v in statuses.items() if k != 200),
            "statuses": {str(k): v for k, v in statuses.items()}}


async def soak(url: str, core: Steering, seconds: float, clients: int, pid: int) -> dict:
    """Steered requests at `clients` for `seconds`, sampling the replica's RSS every 5 s."""
    stop = time.monotonic() + seconds
    samples, errors, sent = [], 0, 0
    payloads = bodies(core, 4096, steered=True, seed=7)

    async def sample():
        while time.monotonic() < stop:
            samples.append((round(seconds - (stop - time.monotonic()), 1), rss_mb(pid)))
            await asyncio.sleep(5)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients),
                                     headers={"content-type": "application/json"}) as session:
        async def client(offset):
            nonlocal errors, sent
            n = offset
            while time.monotonic() < stop:
                async with session.post(url, data=payloads[n % len(payloads)]) as r:
                    await r.read()
                    errors += r.status != 200
                sent, n = sent + 1, n + clients
        await asyncio.gather(sample(), *(client(i) for i in range(clients)))
    first = [m for t, m in samples if t < 60]
    last = [m for t, m in samples if t >= seconds - 60]
    return {"seconds": seconds, "clients": clients, "requests": sent, "errors": errors,
            "rss_mb_first_minute": round(statistics.mean(first), 1), "rss_mb_last_minute": round(statistics.mean(last), 1),
            "rss_growth_mb": round(statistics.mean(last) - statistics.mean(first), 1), "samples": samples}


def in_process_cost(core: Steering, payloads: list[bytes]) -> dict:
    """The answer's own cost, one thread, against the matmul bound of its scoring, (M x D) @ (D x K)."""
    torch.set_num_threads(1)
    parsed = [json.loads(p) for p in payloads]
    for p in parsed[:10]:
        core.recommend(p)
    t = []
    for p in parsed:
        t0 = time.perf_counter()
        core.recommend(p)
        t.append(time.perf_counter() - t0)
    h = core.items.hn  # (M, D) unit rows, as the answer reads them
    mu = torch.randn(core.info.K, core.info.D)  # (K, D)
    for _ in range(5):
        h @ mu.T
    mm = []
    for _ in range(50):
        t0 = time.perf_counter()
        h @ mu.T  # (M, K)
        mm.append(time.perf_counter() - t0)
    answer, bound = statistics.median(t) * 1e3, statistics.median(mm) * 1e3
    return {"answer_ms": round(answer, 3), "matmul_bound_ms": round(bound, 3), "answer_over_bound": round(answer / bound, 1),
            "flops_per_request": 2 * core.info.items * core.info.D * core.info.K}


def start_service(lake: str, run: str, port: int, log: Path, extra: list[str], env_extra: dict | None = None
                  ) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own, never another job's
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="macrid-serve-bench-")
    env.update(env_extra or {})
    with open(log, "w") as err:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "serve.py"), "--lake", lake, "--run", run,
                                 "--port", str(port), *extra], stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                                start_new_session=True)
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        raise SystemExit(f"jobs/serve.py did not start ({log} has its log): {line!r}")
    return proc


def replica_pid() -> int:
    """The ServeReplica process of the steering deployment (Ray names its worker processes by actor class)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if re.search(r"ServeReplica:macrid:macrid-steering", cmd):
                return int(entry.name)
    raise SystemExit("no ServeReplica:macrid:macrid-steering process found")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stop_service(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def table(out: dict) -> str:
    """serve.json as the markdown rows of benchmarks/serve.md."""
    rows = ["| model | M | settings | weights | clients | requests/s | p50 ms | p99 ms | errors |",
            "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for m in out["models"]:
        for key, name in (("levels", "macrid's"), ("baseline_levels", "Serve's defaults")):
            for lv in m.get(key, []):
                rows.append(f"| {m['label']} | {m['items']:,} | {name} | {lv['weights']} | {lv['clients']} | "
                            f"{lv['requests_per_s']:.0f} | {lv['p50_ms']:.1f} | {lv['p99_ms']:.1f} | {lv['errors']} |")
    return "\n".join(rows)


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lake", action="append", default=[])
    p.add_argument("--run", action="append", default=[])
    p.add_argument("--label", action="append", default=[])
    p.add_argument("--requests", type=int, default=2000, help="requests per level (bounded)")
    p.add_argument("--soak", type=float, default=0, help="seconds of the memory run on the first model (0 = none)")
    p.add_argument("--port", type=int, default=8431)
    p.add_argument("--serve-arg", action="append", default=[], help="passed on to jobs/serve.py (repeatable)")
    p.add_argument("--baseline", action="store_true",
                   help="also measure the first model under Ray Serve's defaults (max_ongoing_requests 5, without "
                        "RAY_SERVE_THROUGHPUT_OPTIMIZED), in the same run")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "serve.json"))
    p.add_argument("--table", action="store_true", help="print --out's figures as markdown rows, and nothing else")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    if not args.lake or not len(args.lake) == len(args.run) == len(args.label):
        p.error("pass --lake, --run and --label once per model")
    out = {"command": " ".join(sys.argv), "machine": f"{platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} CPUs", "torch": torch.__version__, "models": []}
    for n, (lake, run, label) in enumerate(zip(args.lake, args.run, args.label)):
        core = Steering(lake, run)
        entry = {"label": label, "run": run, "items": core.info.items, "K": core.info.K, "D": core.info.D, "levels": []}
        entry["cost"] = in_process_cost(core, bodies(core, 300, steered=True, seed=3))
        print(label, entry["cost"], flush=True)
        settings = [("levels", args.serve_arg, {})]
        if args.baseline and n == 0:  # the same levels under Ray Serve's own defaults, in the same run
            settings.append(("baseline_levels", ["--max-ongoing-requests", "5"], {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}))
        for key, serve_args, env_extra in settings:
            entry[key] = []
            proc = start_service(lake, run, args.port, Path(args.out).with_suffix(f".{label}.log"), serve_args,
                                 env_extra)
            url = f"http://127.0.0.1:{args.port}/recommend"
            try:
                asyncio.run(drive(url, bodies(core, 200, False, seed=1), 8))  # warm-up, not reported
                for steered in (False, True):
                    for clients in CLIENTS:
                        level = asyncio.run(drive(url, bodies(core, args.requests, steered, seed=clients), clients))
                        level["weights"] = "steered" if steered else "fixed"
                        entry[key].append(level)
                        print(label, key, level, flush=True)
                if args.soak and n == 0 and key == "levels":
                    entry["soak"] = asyncio.run(soak(url, core, args.soak, 8, replica_pid()))
                    print(label, {k: v for k, v in entry["soak"].items() if k != "samples"}, flush=True)
            finally:
                stop_service(proc)
        out["models"].append(entry)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
