"""Write planted synthetic interactions as raw Parquet shards, streaming: the scale dataset.

  python jobs/generate.py --out lake/raw/scale --users 1000000 --items 1000000

writes <out>/interactions/part-*.parquet (user_id, item_id; one shard per --chunk-users users)
and <out>/items/part-0.parquet (item_id, title, genres = the planted category). Only one chunk of
users is in memory at a time, so memory stays near the catalogue's O(M) arrays plus one chunk.
With --days D it writes a planted lake whose catalogue changes every day instead (macrid/data/daily.py):
one raw folder per day, <out>/day-DD/{interactions,items}/, with new items (and their planted categories)
every day, retired items, and users that come back; <out>/catalogue.parquet holds the ground truth.

  python jobs/generate.py --out lake/raw/daily --days 5 --users 3000 --items 1500 --new-items 0.08
  python jobs/nightly.py --lake lake --input lake/raw/daily/day-01 --dataset daily --model prod --from-scratch

The output may be a local folder or s3://bucket/prefix. Prepare it for training with

  python jobs/prepare.py --input <out>/interactions --items <out>/items --vocabulary catalogue \\
      --heldout 10000 --lake lake --name scale
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from macrid.errors import ConfigError, MacridError, user_error
from macrid.data.daily import DailySpec, write_days
from macrid.data.synthetic import CHUNK_USERS, SyntheticSpec, write_shards


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--users", type=int, default=1_000_000, help="users (default 10^6)")
    p.add_argument("--items", type=int, default=1_000_000, help="catalogue size M (default 10^6)")
    p.add_argument("--K", type=int, default=SyntheticSpec.K, help="planted categories")
    p.add_argument("--zipf", type=float, default=SyntheticSpec.zipf, help="popularity exponent within a category")
    p.add_argument("--mean-items", type=float, default=SyntheticSpec.mean_items, help="typical bag size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-users", type=int, default=CHUNK_USERS, help="users per shard (memory per chunk)")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds (written aside, then swapped in)")
    d = p.add_argument_group("a catalogue that changes every day (--days)")
    d.add_argument("--days", type=int, default=0, help="write this many daily folders instead (0: one static dataset)")
    d.add_argument("--new-items", type=float, default=DailySpec.new_items,
                   help=f"new items a day, as a share of the live catalogue (default {DailySpec.new_items})")
    d.add_argument("--retire", type=float, default=DailySpec.retire,
                   help=f"live items retired a day, as a share (default {DailySpec.retire})")
    d.add_argument("--active", type=float, default=DailySpec.active,
                   help=f"share of the user pool that comes back each day (default {DailySpec.active})")
    d.add_argument("--window", type=int, default=DailySpec.window,
                   help=f"days of events in each day's folder (default {DailySpec.window})")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.days:
        try:
            spec = DailySpec(days=args.days, n_users=args.users, n_items=args.items, K=args.K, zipf=args.zipf,
                             new_items=args.new_items, retire=args.retire, active=args.active, window=args.window,
                             seed=args.seed)
            manifest = write_days(spec, args.out, overwrite=args.overwrite)
        except (MacridError, OSError) as e:
            if user_error(e) is None:  # a fault of the program, not of the input
                raise
            print(f"error: {user_error(e)}", file=sys.stderr)
            return 2
        print(json.dumps({"days": manifest["days"], "out": args.out,
                          "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
        return 0
    try:
        spec = SyntheticSpec(n_users=args.users, n_items=args.items, K=args.K, zipf=args.zipf,
                             mean_items=args.mean_items, seed=args.seed)
        if args.chunk_users < 1:
            raise ConfigError(f"--chunk-users {args.chunk_users} must be at least 1")
        counts = write_shards(spec, args.out, args.chunk_users, overwrite=args.overwrite)
    except (MacridError, OSError) as e:
        if user_error(e) is None:  # a fault of the program, not of the input
            raise
        print(f"error: {user_error(e)}", file=sys.stderr)
        return 2
    print(json.dumps(counts | {"seconds": round(time.perf_counter() - t0, 1), "out": args.out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
