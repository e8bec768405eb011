r"""The gate: promote a finished run to a model alias only if it is not worse than the run the alias points to.

  python jobs/promote.py --lake lake --model prod --candidate ml-1m-2026-12-07
  python jobs/promote.py --lake lake --model prod --candidate RUN --max-drop 0.005
  python jobs/promote.py --lake lake --model prod --rollback
  python jobs/promote.py --lake lake --model prod --show

Both runs are scored on the candidate dataset's validation users (each folded in from the fold-in items it
knows, items matched by ID, scored against all of the user's held-out items: an item a model does not know
is a miss for it), as a paired per-user NDCG@100 difference with its standard error. By default the
candidate is refused when the difference is significantly negative (z <= --min-z, default -2).

The alias lives in <lake>/models/<NAME>/: current.json (one atomic write moves it) and history/ (one record
per promotion, refusal and rollback). jobs/export.py --model NAME and jobs/explain.py --model NAME use it.

Exit status: 0 promoted (or rolled back, or shown), 3 refused (the alias is unchanged), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

from macrid.errors import MacridError, user_error

REFUSED = 3


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lake", required=True, help="lake root: a folder or s3://bucket/prefix")
    p.add_argument("--model", required=True, help="the alias: <lake>/models/<MODEL>/")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--candidate", help="the finished run to promote")
    what.add_argument("--rollback", action="store_true", help="point the alias back at its previous run")
    what.add_argument("--show", action="store_true", help="print the alias's pointer and history")
    p.add_argument("--min-z", type=float, default=-2.0,
                   help="refuse when z = mean difference / SE is at or below this (default -2: significantly worse)")
    p.add_argument("--max-drop", type=float, default=None,
                   help="instead of the z rule: refuse when the mean NDCG@100 difference is below -MAX_DROP")
    p.add_argument("--floor", type=float, default=None,
                   help="also refuse when the candidate's NDCG@100 on these users is below FLOOR")
    p.add_argument("--users", type=int, default=0, help="score a fixed sample of this many validation users "
                                                        "(default 0: all of them)")
    p.add_argument("--device", default="cpu", help="where to score: cpu (default), cuda")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from macrid.training import registry
    from macrid.training.promote import GateRule, promote

    try:
        if args.show:
            print(json.dumps({"current": registry.current(args.lake, args.model),
                              "history": registry.history(args.lake, args.model)}, indent=1))
            return 0
        if args.rollback:
            pointer = registry.rollback(args.lake, args.model)
            print(f"model {args.model!r} rolled back to {pointer['run']} (from {pointer['rolled_back_from']})")
            return 0
        if args.users < 0:
            raise MacridError(f"--users {args.users} must be >= 0")
        decision = promote(args.lake, args.model, args.candidate, GateRule(args.min_z, args.max_drop, args.floor),
                           args.users, args.device)
    except (MacridError, OSError) as e:
        if user_error(e) is None:  # a fault of the program, not of the input
            raise
        print(f"error: {user_error(e)}", file=sys.stderr)
        return 2
    print(decision.message(), file=sys.stdout if decision.promoted else sys.stderr)
    return 0 if decision.promoted else REFUSED


if __name__ == "__main__":
    sys.exit(main())
