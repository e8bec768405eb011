r"""Train MacridVAE (or a Mult* baseline) on a prepared dataset with Ray Train.

With no arguments it trains on the offline synthetic dataset in ./lake, generating it first if
it is missing. The lake may be a local folder or s3://bucket/prefix (credentials and endpoint
from the standard AWS environment variables or the instance role).

  python jobs/train.py
  python jobs/train.py --config configs/ml-1m.toml
  python jobs/train.py --config configs/ml-1m.toml --num-workers 2 --set optim.epochs=5
  python jobs/train.py --config configs/ml-1m.toml --set model.name=multvae
  python jobs/train.py --config configs/ml-1m.toml --set run.name=nightly --resume
  python jobs/train.py --config configs/ml-1m.toml --set data.dataset=ml-1m --warm-start prod --set optim.epochs=5
      (warm start: begin from the run that model alias `prod` points to, or from a run; items matched by ID,
       new items folded in from their co-occurring items: docs/nightly.md)
  python jobs/train.py --config configs/gowalla.toml --set optim.negatives=4098 --set optim.candidates=user
      (sampled softmax for large catalogues: S negatives per batch, docs/sampled_softmax.md)
  python jobs/train.py --config configs/ml-1m.toml --num-workers 4 --use-gpu --precision bf16
  python jobs/train.py --config configs/ml-1m.toml --lake s3://bucket/lake --num-workers 2-4 \
      --set run.name=spot --resume if-any   (elastic on a spot cluster: 2 to 4 workers; the same command
                                         after a lost cluster continues the run from its last checkpoint)
  ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
      python jobs/train.py --config configs/ml-1m.toml --lake "$PWD/lake"

Ray: the job joins a cluster started for it (RAY_ADDRESS, `ray start`, `ray job submit`) and otherwise
starts a local Ray of its own sized to this machine (never another job's). Under `ray job submit` the lake must be an absolute path
(a local head) or s3:// (any cluster): a relative one would resolve inside the uploaded folder.

Resources: each worker reserves --cpus-per-worker CPUs (default: 1 on a cluster, this machine's
CPUs / workers on a local Ray) and, with --use-gpu, --gpus-per-worker GPUs (default 1).
Batch size (optim.batch_size) is global: each of N workers takes batch_size / N users per step.

Outputs go to <lake>/runs/<run>/, which is also Ray Train's storage for the run: its checkpoints
(the latest and the best by validation NDCG@100, reported every epoch), model.pt (the best
model, for export), metrics.json and learning_curve.png. --resume continues from the latest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from macrid.config import load_config, to_toml
from macrid.errors import MacridError, user_error


def worker_count(text: str) -> tuple[int, int]:
    """--num-workers: "N" -> (N, N); "MIN-MAX" -> (MIN, MAX), elastic."""
    low, sep, high = text.partition("-")
    try:
        low_n, high_n = int(low), int(high if sep else low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N or MIN-MAX (e.g. 4, or 2-4)") from None
    if not 1 <= low_n <= high_n:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= MIN <= MAX")
    return low_n, high_n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="TOML config (default: configs/synthetic.toml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set optim.lr=3e-4 (repeatable); every key: --print-config")
    p.add_argument("--lake", help="shortcut for --set data.lake=...")
    p.add_argument("--num-workers", type=worker_count, metavar="N or MIN-MAX",
                   help="Ray Train workers (DDP): N, or MIN-MAX for elastic training that goes on with as few "
                        "as MIN when nodes are lost and grows back to MAX (run.num_workers, run.min_workers)")
    p.add_argument("--use-gpu", action="store_true", help="GPU workers, NCCL (shortcut for run.use_gpu)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs each worker reserves (run.cpus_per_worker)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs each worker reserves with --use-gpu (default 1)")
    p.add_argument("--precision", choices=("fp32", "tf32", "bf16"),
                   help="matmul precision (run.precision; default fp32); the loss and evaluation stay fp32")
    p.add_argument("--resume", nargs="?", const="required", choices=("required", "if-any"),
                   help="continue run.name from its latest checkpoint (refused when it has none); `--resume if-any`: "
                        "continue it when it has one, else start it (a RayJob that retries the same command)")
    p.add_argument("--warm-start", metavar="RUN_OR_MODEL",
                   help="start from a finished run of this lake, or from the run a model alias (jobs/promote.py) "
                        "points to, on this run's dataset: items matched by ID, new items folded in from the items "
                        "they co-occur with, prototypes kept (run.warm_start; docs/nightly.md)")
    p.add_argument("--metrics-port", type=int,
                   help="serve Prometheus metrics, rank r on this port + r (docs/distributed.md)")
    p.add_argument("--metrics-host", help="address the metrics endpoints listen on (default 0.0.0.0, so "
                                          "Prometheus can scrape a cluster's worker nodes; 127.0.0.1 keeps them "
                                          "on this machine)")
    p.add_argument("--in-process", action="store_true", help="run the training loop in this process, without Ray")
    p.add_argument("--device", help="with --in-process: auto (default), cpu, cuda or cuda:N")
    p.add_argument("--print-config", action="store_true",
                   help="print the config this run would use (the file, the --set values and every default) as "
                        "TOML with each key explained, which --config takes back as it is, and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = args.config or os.path.join(here, "configs", "synthetic.toml")
    overrides = list(args.set)
    if args.num_workers is not None:
        low, high = args.num_workers
        overrides += [f"run.num_workers={high}"] + ([f"run.min_workers={low}"] if low != high else [])
    for flag, key in (("lake", "data.lake"), ("metrics_port", "run.metrics_port"),
                      ("metrics_host", "run.metrics_host"),
                      ("cpus_per_worker", "run.cpus_per_worker"), ("gpus_per_worker", "run.gpus_per_worker"),
                      ("precision", "run.precision"), ("device", "run.device")):
        value = getattr(args, flag)
        if value is not None:
            # a TOML value: strings as basic strings (JSON's escapes are TOML's), so 'a\b' stays a\b
            overrides.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    if args.use_gpu:
        overrides.append("run.use_gpu=true")
    if args.resume:
        overrides.append("run.resume=true")
    try:
        cfg = load_config(path, overrides)
        if args.resume == "required":
            from macrid.training.run_folder import require_resumable

            require_resumable(cfg)
        if args.warm_start:
            from macrid.training.registry import with_parent

            cfg = with_parent(cfg, args.warm_start)
        if args.print_config:
            print(to_toml(cfg, header=f"{path}{' with ' + ' '.join(overrides) if overrides else ''}, "
                                      "every key written out", explain=True), end="")
            return 0
        _ensure_default_dataset(cfg)
        if args.in_process:
            from macrid.training.launch import prepare_config
            from macrid.training.train import run_in_process

            run_in_process(prepare_config(cfg))
        else:
            from macrid.training.launch import launch

            launch(cfg)  # prints the summary once, from this driver
    except (MacridError, OSError) as e:
        if user_error(e) is None:  # a fault of the program, not of the input
            raise
        print(f"error: {user_error(e)}", file=sys.stderr)
        return 2
    return 0


def _ensure_default_dataset(cfg) -> None:
    """The embedded default: generate the synthetic dataset offline the first time it is needed."""
    from macrid.data import lake
    from macrid.data.layout import dataset_uri
    from macrid.data.prepare import prepare
    from macrid.data.split import Protocol
    from macrid.data.synthetic import SyntheticSpec, generate

    if cfg.data.dataset == "synthetic" and not lake.exists(f"{dataset_uri(cfg.data.lake, 'synthetic')}/_meta.json"):
        print(f"[macrid] generating the synthetic dataset in {cfg.data.lake}/datasets/synthetic", flush=True)
        prepare(generate(SyntheticSpec()), cfg.data.lake, "synthetic", Protocol(), overwrite=True)


if __name__ == "__main__":
    sys.exit(main())
