"""Write planted synthetic interactions as raw Parquet shards, streaming: the scale dataset.

  python jobs/generate.py --out lake/raw/scale --users 1000000 --items 1000000

writes <out>/interactions/part-*.parquet (user_id, item_id; one shard per --chunk-users users)
and <out>/items/part-0.parquet (item_id, title, genres = the planted category). Only one chunk of
users is in memory at a time, so memory stays near the catalogue's O(M) arrays plus one chunk.
The output may be a local folder or s3://bucket/prefix. Prepare it for training with

  python jobs/prepare.py --input <out>/interactions --items <out>/items --vocabulary catalogue \\
      --heldout 10000 --lake lake --name scale
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from macrid.errors import ConfigError, MacridError
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
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        spec = SyntheticSpec(n_users=args.users, n_items=args.items, K=args.K, zipf=args.zipf,
                             mean_items=args.mean_items, seed=args.seed)
        if args.chunk_users < 1:
            raise ConfigError(f"--chunk-users {args.chunk_users} must be at least 1")
        counts = write_shards(spec, args.out, args.chunk_users)
    except MacridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(counts | {"seconds": round(time.perf_counter() - t0, 1), "out": args.out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
