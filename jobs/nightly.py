r"""The nightly loop as one job, for the CronJob: prepare today's dataset version, warm-start train from the
model alias, gate the candidate against the alias's run, export what the alias then points to.

  python jobs/nightly.py --lake s3://bucket/lake --input s3://bucket/events/2026-12-07 --dataset shop \
      --model prod --export nightly --config configs/ml-1m.toml --set optim.epochs=10 --pushgateway http://pg:9091
  python jobs/nightly.py --lake lake --input lake/raw/daily/day-03/interactions --items lake/raw/daily/day-03/items \
      --dataset daily --model prod --export nightly --in-process --local      (a laptop, small data)

Stages (each is the library code of its own job: prepare.py, train.py, promote.py, export.py):
  prepare  --input -> a new version of --dataset (runs keep reading the version they started on)
  train    a run named <model>-<date>-<time>, warm-started from the run --model points to (items matched by ID,
           new items folded in: docs/nightly.md); from scratch on the first night or with --from-scratch
  promote  the gate (jobs/promote.py): refused when the candidate is significantly worse than the alias's run
  export   jobs/export.py --model MODEL --input DATASET: the date's partition of every table

A stage that fails, or a refused promotion, stops the night: the alias and every export table stay as they
were. With --pushgateway (or PUSHGATEWAY_URL), each stage's duration and outcome and the gate's decision are
pushed (job macrid_nightly; alert rules in infra/prometheus/alerts.yaml).

Exit status: 0 the night went through; 2 bad arguments (nothing ran); 3 the gate refused the candidate;
4 prepare failed; 5 training failed; 6 the gate failed (not a refusal: an unreadable run, say); 7 export failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

EXIT = {"promote-refused": 3, "prepare": 4, "train": 5, "promote": 6, "export": 7}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lake", required=True, help="lake root: a folder or s3://bucket/prefix")
    p.add_argument("--input", action="append", required=True,
                   help="today's raw interactions (any input prepare reads); repeat for a union of sources")
    p.add_argument("--items", default="", help="item metadata table (item_id, title, genres), as prepare --items")
    p.add_argument("--user-col", default="user_id", help="user column of a raw table")
    p.add_argument("--item-col", default="item_id", help="item column of a raw table")
    p.add_argument("--rating-col", default=None, help="rating column (omit for implicit data)")
    p.add_argument("--min-rating", type=float, default=4.0, help="keep ratings >= this (default 4)")
    p.add_argument("--heldout", type=float, default=0.1, help="validation and test users each (default 0.1)")
    p.add_argument("--dataset", required=True, help="the dataset whose new version tonight's input becomes")
    p.add_argument("--model", required=True, help="the model alias to warm-start from, promote to and export")
    p.add_argument("--export", default="nightly", help="export name: <lake>/exports/<export>/ (default nightly)")
    p.add_argument("--date", default="", help="the export's partition, YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--top-n", type=int, default=100, help="recommendations per user in the export (default 100)")
    p.add_argument("--config", default="", help="training config TOML (default configs/synthetic.toml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one training config value (repeatable), e.g. --set optim.epochs=10")
    p.add_argument("--from-scratch", action="store_true", help="train without a parent tonight")
    p.add_argument("--min-z", type=float, default=-2.0, help="the gate: refuse at z <= this (default -2)")
    p.add_argument("--max-drop", type=float, default=None, help="the gate: refuse when the NDCG@100 difference "
                                                                "is below -MAX_DROP (instead of the z rule)")
    p.add_argument("--floor", type=float, default=None, help="the gate: also refuse below this NDCG@100")
    p.add_argument("--gate-users", type=int, default=0, help="validation users the gate scores (default: all)")
    p.add_argument("--in-process", action="store_true", help="train in this process instead of on Ray Train")
    p.add_argument("--local", action="store_true", help="prepare and export in this process (small data)")
    p.add_argument("--pushgateway", default=os.environ.get("PUSHGATEWAY_URL", ""),
                   help="Prometheus Pushgateway address (default: $PUSHGATEWAY_URL)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    from macrid.names import check_name
    from macrid.errors import MacridError
    from macrid.nightly import NightlySpec, run_night
    from macrid.training.promote import GateRule

    try:
        for kind, name in (("dataset", args.dataset), ("model", args.model), ("export", args.export)):
            check_name(kind, name)
        if args.date and not (len(args.date) == 10 and time.strptime(args.date, "%Y-%m-%d")):
            raise MacridError(f"--date {args.date!r} is not YYYY-MM-DD")
        if args.top_n < 0 or args.gate_users < 0:
            raise MacridError("--top-n and --gate-users must be >= 0")
    except (MacridError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    spec = NightlySpec(lake=args.lake, inputs=tuple(args.input), dataset=args.dataset, model=args.model,
                       export=args.export, date=args.date, config=args.config, overrides=tuple(args.set),
                       items=args.items, user_col=args.user_col, item_col=args.item_col, rating_col=args.rating_col,
                       min_rating=args.min_rating, heldout=args.heldout, from_scratch=args.from_scratch,
                       in_process=args.in_process, local=args.local, top_n=args.top_n,
                       gate=GateRule(args.min_z, args.max_drop, args.floor), gate_users=args.gate_users)
    night = run_night(spec)
    if night.error:
        print(f"error: {night.stopped_at}: {night.error}", file=sys.stderr)
    status = 0 if night.stopped_at is None else EXIT["promote-refused" if night.refused else night.stopped_at]
    if args.pushgateway:
        from macrid.errors import redact
        from macrid.training.telemetry import push_nightly

        try:
            push_nightly(args.pushgateway, args.model, night)
        except OSError as e:
            print(redact(f"warning: could not push to the Pushgateway at {args.pushgateway} ({e}); tonight's "
                         "outcome is not monitored"), file=sys.stderr)
    print(json.dumps({"run": night.run, "parent": night.parent, "stopped_at": night.stopped_at,
                      "refused": night.refused, "seconds": night.seconds, "status": status}, indent=1))
    return status


if __name__ == "__main__":
    from macrid.cluster import exit_now

    exit_now(main())
