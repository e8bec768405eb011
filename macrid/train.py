"""Training: the Ray Train worker function and the driver that launches it.

`train_loop_per_worker(config)` is what every Ray Train worker runs. It calls
`fit`, which is also callable in-process (tests, sweeps inside one process).
Batch size is global: each of W workers takes batch_size / W users of every
step's batch, so the effective batch does not change with W.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from macrid import checkpoint
from macrid.batches import Dataset, iter_batches, load_dataset
from macrid.config import Config
from macrid.evaluate import evaluate, torch_scorer
from macrid.lake import join, resolve, write_json
from macrid.loss import beta_at, elbo_loss
from macrid.model import build_model
from macrid.report import format_metrics, plot_learning_curve

log = logging.getLogger(__name__)
Reporter = Callable[[dict], None]


def run_dir(cfg: Config) -> str:
    return resolve(join(cfg.data.lake, "runs", cfg.run.name))[1]


def fit(cfg: Config, report: Reporter | None = None, rank: int = 0, world: int = 1,
        wrap_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m) -> dict:
    """Train, select the best epoch on validation NDCG@100, write the run folder. Returns metrics.json."""
    torch.set_num_threads(cfg.run.threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count())
    torch.manual_seed(cfg.run.seed + rank)
    data = load_dataset(cfg.data.lake, cfg.data.dataset)
    fingerprint = data.meta["vocabulary_fingerprint"]
    model = build_model(cfg.model, data.n_items)
    train_model = wrap_model(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    out_dir = run_dir(cfg)
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    steps_per_epoch = math.ceil(data.train.n_rows / cfg.optim.batch_size)
    step, best, best_epoch, bad_evals, history = 0, -1.0, 0, 0, []
    ckpt_meta = dict(config=cfg.to_dict(), n_items=data.n_items, fingerprint=fingerprint)
    bar = _progress(cfg.optim.epochs, enabled=cfg.run.progress and rank == 0, desc=cfg.run.name)
    t_train = time.perf_counter()
    for epoch in range(1, cfg.optim.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        sums = {"loss": 0.0, "nll": 0.0, "kl": 0.0}
        rng = np.random.default_rng([cfg.run.seed, epoch])  # same order on every worker
        for _, idx, off in iter_batches(data.train, cfg.optim.batch_size, rng):
            if world > 1:
                idx, off = _shard(idx, off, rank, world)
            beta = beta_at(step, steps_per_epoch, cfg.optim.beta, cfg.optim.anneal_epochs)
            loss, parts = elbo_loss(train_model(idx, off), idx, off, beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sums["loss"] += loss.item()
            sums["nll"] += parts["nll"]
            sums["kl"] += parts["kl"]
        row = {"epoch": epoch, "step": step, "beta": beta, "seconds": time.perf_counter() - t0,
               **{k: v / steps_per_epoch for k, v in sums.items()}}
        if epoch % cfg.run.eval_every == 0 or epoch == cfg.optim.epochs:
            val = evaluate(torch_scorer(model), data.val, data.n_items)
            row["val_ndcg@100"] = val["ndcg@100"][0]
            if row["val_ndcg@100"] > best:
                best, best_epoch, bad_evals = row["val_ndcg@100"], epoch, 0
                if rank == 0:
                    checkpoint.save(f"{ckpt_dir}/best.pt", model=model, optimizer=None, step=step, epoch=epoch,
                                    **ckpt_meta)
            else:
                bad_evals += 1
        history.append(row)
        if rank == 0:
            checkpoint.save(f"{ckpt_dir}/latest.pt", model=model, optimizer=opt, step=step, epoch=epoch, **ckpt_meta)
        bar.update(1)
        bar.set_postfix_str(f"loss {row['loss']:.1f} val ndcg@100 {row.get('val_ndcg@100', float('nan')):.4f}"
                            f" best {best:.4f}@{best_epoch}")
        if report is not None:
            report(row)
        if cfg.run.patience and bad_evals >= cfg.run.patience:
            log.info("no validation gain for %d evaluations: stopping at epoch %d", bad_evals, epoch)
            break
    bar.close()
    train_seconds = time.perf_counter() - t_train
    if rank != 0:
        return {}
    return finish(cfg, data, model, history, best_epoch, train_seconds)


def finish(cfg: Config, data: Dataset, model: torch.nn.Module, history: list[dict], best_epoch: int,
           train_seconds: float) -> dict:
    """Reload the best epoch, score validation and test, write metrics.json and the learning curve."""
    out_dir = run_dir(cfg)
    state = checkpoint.load(f"{out_dir}/checkpoints/best.pt", data.meta["vocabulary_fingerprint"])
    model.load_state_dict(state["model"])
    val = evaluate(torch_scorer(model), data.val, data.n_items)
    test = evaluate(torch_scorer(model), data.test, data.n_items)
    epoch_secs = [h["seconds"] for h in history]
    metrics = {
        "run": cfg.run.name, "dataset": cfg.data.dataset, "model": cfg.model.name, "config": cfg.to_dict(),
        "best_epoch": best_epoch, "epochs_run": len(history), "train_seconds": train_seconds,
        "median_epoch_seconds": float(np.median(epoch_secs)), "val": val, "test": test, "history": history,
        "vocabulary_fingerprint": data.meta["vocabulary_fingerprint"],
    }
    write_json(f"{out_dir}/metrics.json", metrics)
    plot_learning_curve(history, f"{out_dir}/learning_curve.png", f"{cfg.run.name} ({cfg.model.name})")
    print(f"[macrid] best epoch {best_epoch}  val: {format_metrics(val)}", flush=True)
    print(f"[macrid] test: {format_metrics(test)}", flush=True)
    print(f"[macrid] run folder: {out_dir}", flush=True)
    return metrics


def _shard(idx: torch.Tensor, off: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This worker's contiguous slice of the users of a global batch."""
    B = len(off) - 1
    lo, hi = rank * B // world, (rank + 1) * B // world
    return idx[off[lo]:off[hi]], off[lo:hi + 1] - off[lo]


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="epoch", disable=not enabled, file=sys.stdout,
                dynamic_ncols=False, ncols=110, mininterval=1.0)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: rebuild the typed config once, then train."""
    import ray.train
    import ray.train.torch

    cfg = Config.from_dict(config, source="train_loop_config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    wrap = ray.train.torch.prepare_model if world > 1 else (lambda m: m)
    metrics = fit(cfg, report=lambda row: ray.train.report(row) if rank == 0 else None, rank=rank, world=world,
                  wrap_model=wrap)
    if world > 1:
        return
    if metrics:
        ray.train.report({"val_ndcg@100": metrics["val"]["ndcg@100"][0],
                          "test_ndcg@100": metrics["test"]["ndcg@100"][0]})


def launch(cfg: Config) -> dict:
    """Driver: start (or join) Ray, run the worker function under a TorchTrainer, return metrics.json."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not cfg.run.name:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(
            cfg.run, name=f"{cfg.data.dataset}-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"))
    if not ray.is_initialized():
        ray.init(include_dashboard=False, object_store_memory=256 * 1024**2, log_to_driver=True,
                 configure_logging=False)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // cfg.run.num_workers)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=False,
                                     resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=cfg.run.name, storage_path=join(run_dir(cfg), "ray")),
    )
    trainer.fit()
    import json

    with open(os.path.join(run_dir(cfg), "metrics.json")) as f:
        return json.load(f)
