"""Nightly export: a trained run's user components, item concepts, recommendations and prototypes,
written to the lake as Delta tables partitioned by date.

  python jobs/export.py --lake lake --run ml-1m-run --input ml-1m --name nightly --top-n 100
  python jobs/export.py --lake lake --model prod --input ml-1m --name nightly --top-n 100   (what alias prod points to)
  ray job submit -- python jobs/export.py --lake s3://bucket/lake --run prod --input s3://bucket/events/today \\
      --name nightly --date 2026-11-28 --top-n 100 --workers 4 --gpus-per-worker 1

--input is a dataset of the lake (all its users) or raw interactions in any format `prepare` reads
(a file, a folder or an s3:// prefix). The tables land in <lake>/exports/<name>/{user_components,
item_concepts,recommendations,prototypes}; each is committed once, and a re-run for the same --date
replaces that date's partition. A fifth table, manifest, committed last, names the version of each table
that holds the date, so readers get one whole export (macrid.output.manifest.read). One export of a name
runs at a time: a second one is refused while the first holds <lake>/exports/<name>/_lease.json.
Columns and example queries: docs/export-schema.md.

Monitoring: with --pushgateway URL (or PUSHGATEWAY_URL), every run pushes its users, dropped items,
duration and last success (or failure) time to a Prometheus Pushgateway, job "macrid_export".
Exit status: 0 done, 2 bad input or configuration (nothing was committed), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from macrid.errors import MacridError, user_error
from macrid.output.export import ExportSpec, export
from macrid.data.formats import FORMATS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lake", required=True, help="lake root: a folder or s3://bucket/prefix")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--run", help="the trained run (a folder of <lake>/runs) whose best model to use")
    model.add_argument("--model", metavar="NAME", help="the run a model alias points to now (jobs/promote.py)")
    p.add_argument("--input", required=True, help="a dataset name of the lake, or raw interactions (path or s3://)")
    p.add_argument("--name", required=True, help="export name: the tables go to <lake>/exports/<name>/")
    p.add_argument("--date", default="", help="the partition, YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--top-n", type=int, default=0, help="also write each user's top-N recommendations (default 0: "
                                                        "no recommendations table)")
    p.add_argument("--workers", type=int, default=1, help="Ray Data actors computing users (default 1)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per actor (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor (default 0: CPU)")
    p.add_argument("--batch-size", type=int, default=2000, help="users per actor call (default 2000)")
    p.add_argument("--format", default="auto", choices=FORMATS, help="raw input format (default: from the name)")
    p.add_argument("--user-col", default="user_id", help="user column of a raw table")
    p.add_argument("--item-col", default="item_id", help="item column of a raw table")
    p.add_argument("--rating-col", default=None, help="rating column of a raw table (ratings below the "
                                                      "dataset's min_rating are dropped, as in training)")
    p.add_argument("--pushgateway", default=os.environ.get("PUSHGATEWAY_URL", ""),
                   help="Prometheus Pushgateway address, e.g. http://pushgateway:9091 (default: $PUSHGATEWAY_URL)")
    p.add_argument("--local", action="store_true",
                   help="compute in this process without Ray (same files and tables): for small exports, where "
                        "starting Ray and its actors takes longer than the work")
    p.add_argument("--retention-hours", type=int, default=168,
                   help="after committing, vacuum each table: delete files that no version of the last this many "
                        "hours uses (older versions, a killed export's files). Readers pinned to an earlier "
                        "export (time travel, the manifest) need it to cover them (default: 168, one week)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")

    t0, summary, status = time.time(), None, 1
    try:
        run = args.run if args.model is None else _alias(args.lake, args.model)
    except (MacridError, OSError) as e:
        if user_error(e) is None:  # a fault of the program, not of the input
            raise
        print(f"error: {user_error(e)}", file=sys.stderr)
        return 2
    spec = ExportSpec(lake=args.lake, run=run, input=args.input, name=args.name, date=args.date,
                      top_n=args.top_n, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                      gpus_per_worker=args.gpus_per_worker, batch_size=args.batch_size, format=args.format,
                      user_col=args.user_col, item_col=args.item_col, rating_col=args.rating_col,
                      local=args.local, retention_hours=args.retention_hours)
    try:
        summary = export(spec, progress=not args.quiet)
        status = 0
    except (MacridError, OSError) as e:
        if user_error(e) is None:  # a fault of the program, not of the input
            raise
        print(f"error: {user_error(e)}", file=sys.stderr)
        status = 2
    finally:
        if args.pushgateway:
            _push(args.pushgateway, args.name, summary, time.time() - t0)
    if summary is not None:
        print(json.dumps({k: summary[k] for k in ("date", "export_id", "counts", "seconds", "versions")}, indent=1))
    return status


def _alias(lake: str, name: str) -> str:
    from macrid.training.registry import current_run

    return current_run(lake, name)


def _push(gateway: str, name: str, summary: dict | None, seconds: float) -> None:
    from macrid.errors import redact
    from macrid.training.telemetry import push_export

    try:
        push_export(gateway, name, summary, seconds)
    except OSError as e:  # the export's outcome stands; say that monitoring did not get it
        print(redact(f"warning: could not push to the Pushgateway at {gateway} ({e}); the export's outcome is "
                     "not monitored for this run"), file=sys.stderr)


if __name__ == "__main__":
    from macrid.cluster import exit_now

    exit_now(main())
