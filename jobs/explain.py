"""See and steer a trained MacridVAE run (Sec. 2.4 of the paper), with item titles.

  python jobs/explain.py --lake lake --run ml-1m-prod traverse --item 2571 --dim 3
  python jobs/explain.py --lake lake --run ml-1m-prod traverse --user 42 --component 2 --dim 7 --steps 10
  python jobs/explain.py --lake lake --run ml-1m-prod steer --user 42 --set 2:7=0.4 --weight 5=0 --top-n 10
  python jobs/explain.py --lake lake --run ml-1m-prod report        # -> <lake>/runs/ml-1m-prod/report.html
  python jobs/explain.py --lake s3://lake --export nightly --date 2026-11-28 steer --user 42 --weight 5=0

--run reads the run's checkpoint; --export reads the nightly export's tables instead (no checkpoint:
item vectors, concepts and prototypes from item_concepts/prototypes, a user's components from
user_components, of the date --date, default the latest export).

traverse: starting from an item's representation h_i or from component k of a user, moves dimension j
through the range where the starting concept stays the nearest prototype, and lists one item per
subrange (equal numbers of that concept's items in each), chosen by beam search so the other
dimensions stay close to the start (gamma weighs the items' closeness to one another).
steer: a user's top-N before and after setting dimension j of component k (--set k:j=value) or the
weight of concept k (--weight k=w: the items whose concept, the mode argmax_k c_ik, is k have their A_ui
multiplied by w; 0 removes every one of them, 2 doubles their score's A), with the concept of each item.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from macrid.errors import ConfigError, MacridError, user_error


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lake", required=True, help="lake root: a folder or s3://bucket/prefix")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a finished run of <lake>/runs (its model.pt)")
    source.add_argument("--model", metavar="NAME", help="the run a model alias points to now (jobs/promote.py)")
    source.add_argument("--export", metavar="NAME", help="an export of <lake>/exports (traverse and steer only)")
    p.add_argument("--date", help="with --export: the export date YYYY-MM-DD (default: the latest export)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("traverse", help="walk one dimension from an item or a user's component")
    t.add_argument("--item", help="start from this item ID")
    t.add_argument("--user", help="start from this user ID's component --component")
    t.add_argument("--component", type=int, default=0, help="the user's component k (default 0)")
    t.add_argument("--dim", type=int, required=True, help="the dimension j to move (0..D-1)")
    t.add_argument("--steps", type=int, default=8, help="B: items along the trajectory (default 8)")
    t.add_argument("--gamma", type=float, default=0.1, help="weight of the items' closeness to one another")
    t.add_argument("--beam", type=int, default=16, help="beam width (default 16)")
    s = sub.add_parser("steer", help="a user's top-N after editing a component or a concept's weight")
    s.add_argument("--user", required=True, help="the user ID")
    s.add_argument("--set", action="append", default=[], metavar="K:J=VALUE", help="set dimension J of component K")
    s.add_argument("--weight", action="append", default=[], metavar="K=W", help="weight of concept K (default 1): 0 removes the items of concept K, 2 doubles their A_ui")
    s.add_argument("--top-n", type=int, default=10, help="items listed (default 10)")
    sub.add_parser("report", help="write <lake>/runs/<run>/report.html: concepts, genre alignment, item map, "
                                  "traversals, learning curve (one self-contained file)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from macrid.output.explain import ExportedRun, Run, steering, traversal

    try:
        edits = [_edit(e) for e in getattr(args, "set", [])]  # malformed values stop here, before a run is read
        weights = dict(_weight(w) for w in getattr(args, "weight", []))
        _check_ranges(args)
        if args.model is not None:
            from macrid.training.registry import current_run

            args.run = current_run(args.lake, args.model)
        if args.command == "report" and args.export is not None:
            raise ConfigError("report needs --run (it reads the run's metrics and learning curve)")
        run = ExportedRun(args.lake, args.export, args.date) if args.export is not None else Run(args.lake, args.run)
        if args.command == "report":
            from macrid.output.html_report import write

            print(write(args.lake, args.run))
            return 0
        if args.command == "traverse":
            out = traversal(run, args.dim, args.item, args.user, args.component, args.steps, args.gamma, args.beam)
        else:
            out = steering(run, args.user, edits, weights, args.top_n)
    except (MacridError, OSError) as e:
        if user_error(e) is None:  # a fault of the program, not of the input
            raise
        print(f"error: {user_error(e)}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1, default=float) if args.json else _text(out))
    return 0


def _check_ranges(args: argparse.Namespace) -> None:
    """Counts are at least 1 (a zero beam or -5 items has no meaning); --gamma is a finite number."""
    for flag in ("steps", "beam", "top_n"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {value} must be at least 1")
    if getattr(args, "gamma", None) is not None and not math.isfinite(args.gamma):
        raise ConfigError(f"--gamma {args.gamma} must be a finite number")


def _edit(text: str) -> tuple[int, int, float]:
    try:
        kj, value = text.split("=")
        k, j = kj.split(":")
        k, j, v = int(k), int(j), float(value)
    except ValueError:
        raise ConfigError(f"--set {text!r}: write K:J=VALUE, e.g. --set 2:7=0.4") from None
    if not math.isfinite(v):
        raise ConfigError(f"--set {text!r}: the value must be a finite number")
    return k, j, v


def _weight(text: str) -> tuple[int, float]:
    try:
        k, w = text.split("=")
        k, w = int(k), float(w)
    except ValueError:
        raise ConfigError(f"--weight {text!r}: write K=W, e.g. --weight 5=0") from None
    if not math.isfinite(w) or w < 0:
        raise ConfigError(f"--weight {text!r}: a concept's weight is a finite number >= 0")
    return k, w


def _text(out: dict) -> str:
    if "steps" in out:
        a, b = out["range"]
        lines = [f"from {out['from']}: concept {out['concept']}, dimension {out['dimension']} over ({a:.3f}, {b:.3f})"]
        lines += [f"  {s['value']:+.3f}  {s['item']}" for s in out["steps"]]
        return "\n".join(lines)
    lines = [f"user {out['user']}: top {len(out['before'])} before -> after"]
    for i, (x, y) in enumerate(zip(out["before"], out["after"]), 1):
        lines.append(f"  {i:2d}. [{x['concept']}] {x['item'][:45]:45s}  ->  [{y['concept']}] {y['item'][:45]}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
