"""prepare's driver memory at the default held-out share against a fixed held-out count (issue 30, item 5).

  python jobs/generate.py --out /data/raw/p1e7 --users 210000 --items 1000000      # 1.0 x 10^7 interactions
  python jobs/generate.py --out /data/raw/p4e7 --users 840000 --items 1000000      # 4.0 x 10^7
  git worktree add /tmp/macrid-before-stream <the commit before the streamed split>
  python benchmarks/prepare_heldout.py --raw /data/raw --before /tmp/macrid-before-stream   # -> prepare_heldout.json

Every row is one `python jobs/prepare.py --input <raw>/interactions --items <raw>/items --vocabulary catalogue
--heldout H` (its own local Ray, as on a laptop), measured as benchmarks/prepare.py measures (the driver's
peak RSS, the tree's peak PSS, sampled every 0.25 s from /proc). Rows, at both sizes, in one run:
- `before, share 0.1`: the commit before the streamed split, at the default held-out share (10% + 10% of users);
- `now, share 0.1`: this tree, the default;
- `now, count 10000`: this tree, a fixed count (what benchmarks/prepare.md measured).
The target: the driver's peak at the default share grows no more than at a fixed count from 10^7 to 4 x 10^7.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from prepare import measure  # noqa: E402  (benchmarks/prepare.py: the same sampling)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", default="/data/raw", help="folder holding p1e7/ and p4e7/ from jobs/generate.py")
    p.add_argument("--before", required=True, help="a worktree of the commit before the streamed fold-in split")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "prepare_heldout.json"))
    args = p.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    work = tempfile.mkdtemp(prefix="macrid-heldout-bench-")
    rows = []
    for data in ("p1e7", "p4e7"):
        raw = os.path.join(args.raw, data)
        with open(os.path.join(raw, "_manifest.json")) as f:
            interactions = json.load(f)["interactions"]
        for label, tree, heldout in (("before, share 0.1", args.before, "0.1"), ("now, share 0.1", ROOT, "0.1"),
                                     ("now, count 10000", ROOT, "10000")):
            lake_dir = os.path.join(work, "lake")
            shutil.rmtree(lake_dir, ignore_errors=True)
            cmd = [sys.executable, os.path.join(tree, "jobs", "prepare.py"), "--input", f"{raw}/interactions",
                   "--items", f"{raw}/items", "--vocabulary", "catalogue", "--heldout", heldout, "--lake", lake_dir,
                   "--name", "bench"]
            r = measure(cmd, env | {"PYTHONPATH": tree})
            r.pop("stdout")
            with open(os.path.join(lake_dir, "datasets", "bench", "_meta.json")) as f:
                meta = json.load(f)
            r |= {"row": label, "data": data, "interactions": interactions,
                  "heldout_users": meta["val"]["users"] + meta["test"]["users"],
                  "heldout_interactions": sum(meta[s]["foldin"] + meta[s]["heldout"] for s in ("val", "test"))}
            print(json.dumps(r), flush=True)
            rows.append(r)
            shutil.rmtree(lake_dir, ignore_errors=True)
    growth = {}
    for label in ("before, share 0.1", "now, share 0.1", "now, count 10000"):
        small, big = (next(r for r in rows if r["row"] == label and r["data"] == d) for d in ("p1e7", "p4e7"))
        growth[label] = round(big["driver_peak_gb"] / small["driver_peak_gb"], 3)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                         f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1024**3:.0f} GiB",
              "python": platform.python_version(), "rows": rows, "driver_growth_1e7_to_4e7": growth}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(growth))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
