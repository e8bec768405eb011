"""The training loop, `fit`, shared by Ray Train workers, sweeps and in-process runs.

Batch size is global: with W workers each takes batch_size / W users of every step, and DDP
averages the gradients, so a step with W workers equals a step with one worker on all B users.
Every tensor lives on the session's device (a worker's GPU, or the CPU); batches are copied there
through pinned memory. Only rank 0 evaluates (validation sets are small); it broadcasts whether to
stop, so every rank runs the same number of steps. Each epoch ends with one report to the session
(macrid/training/session.py): the metrics, and rank 0's checkpoint, from which a restarted run resumes.
After training, `finish` scores the best epoch on validation and test and writes the run folder.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from macrid.config import Config
from macrid.data import lake
from macrid.data.bags import pinned_ahead, to_device
from macrid.data.batches import CSR, Dataset, item_counts, load_dataset, load_train_share
from macrid.model import prototypes
from macrid.model.loss import beta_at, lr_at
from macrid.model.row_sparse import Optimizers, tables_of
from macrid.model.sampling import NegativeSampler
from macrid.model.vae import build_model
from macrid.training import checkpoint, warm_start
from macrid.training.averaging import WeightAverage
from macrid.training.evaluate import evaluate, model_ranker
from macrid.training.report import format_metrics, plot_learning_curve
from macrid.training.row_exchange import broadcast_tables, ignore_in_ddp
from macrid.training.run_folder import METRICS_FILE, MODEL_FILE, RUN_FILE, has_run, pin_run, run_uri
from macrid.training.session import SCORE, LocalSession
from macrid.training.step import Autocast, Objective, objective_for, precision_context, tf32_scope, train_step
from macrid.training.telemetry import TrainMetrics

log = logging.getLogger(__name__)
# epoch -> this worker's batches of (indices (N,), offsets (B+1,)), on the host
BatchSource = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class ModelKind:
    """What the loop does differently per model, decided once from the config (model.name, model.prior)."""

    composite_prior: bool  # RecVAE's prior: q_old frozen from the encoder as each epoch starts
    prototypes: bool  # MacridVAE's prototypes m_k: re-centred by k-means at model.proto_init_epoch

    @classmethod
    def of(cls, cfg: Config) -> ModelKind:
        macrid = cfg.model.name == "macridvae"
        return cls(composite_prior=macrid and cfg.model.prior == "composite", prototypes=macrid)


@dataclass
class Loop:
    """Everything `fit` sets up once and every epoch uses."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    data: Dataset  # the held-out sets; the training bags come from `batches`
    kind: ModelKind
    model: torch.nn.Module
    train_model: torch.nn.Module  # the model, wrapped by DDP on several workers
    eval_model: torch.nn.Module  # the EMA average when optim.ema > 0, else the model
    tables: list[torch.nn.Parameter]  # the item tables exchanged row-wise, outside DDP
    opt: Optimizers
    ema: WeightAverage | None
    objective: Objective  # the softmax mode's scorer and likelihood
    sampler: NegativeSampler | None
    batches: BatchSource
    passes: list[tuple[tuple, bool]]  # _passes
    steps: int  # optimizer updates per epoch
    lr: float
    autocast: Autocast
    metrics: object | None  # TrainMetrics, when run.metrics_port is set
    ckpt_meta: dict


def fit(cfg: Config, session, train_batches: BatchSource | None = None) -> list[dict]:
    """Train, reporting every epoch to `session`; returns the history (one row per epoch, all epochs).

    Setup (`_set_up`: model, optimizer, resume or warm start, DDP, input, sampler), then per epoch
    `run_epoch` -> `_validate` (rank 0) -> `_report` (the checkpoint), until the last epoch or patience."""
    loop, state = _set_up(cfg, session, train_batches)
    bar = _progress(cfg.optim.epochs, state["epoch"], enabled=cfg.run.progress and loop.rank == 0, desc=cfg.run.name)
    if state["stopped"] and loop.rank == 0:  # a RayJob retry or a --resume of a run that had stopped on patience
        log.info("%s stopped on patience at epoch %d: nothing to resume", cfg.run.name, state["epoch"])
    last = state["epoch"] if state["stopped"] else cfg.optim.epochs
    for epoch in range(state["epoch"] + 1, last + 1):
        row = run_epoch(loop, state, epoch)
        stop = _validate(cfg, loop.data, loop.eval_model, epoch, row, state) if loop.rank == 0 else False
        _report(loop, session, state, row, stop)
        bar.set_postfix_str(f"loss {row['loss']:.1f} val ndcg@100 {row.get('val_ndcg@100', float('nan')):.4f}"
                            f" best {state['best']:.4f}@{state['best_epoch']}", refresh=False)
        bar.update(1)  # one redraw per epoch: Ray forwards every redraw as a log line
        if _agree(stop, loop.world, loop.device):
            if loop.rank == 0:
                log.info("no validation gain for %d evaluations: stopping at epoch %d", state["bad_evals"], epoch)
            break
    bar.close()
    if loop.metrics is not None:
        loop.metrics.close()
    return state["history"]


def _set_up(cfg: Config, session, train_batches: BatchSource | None) -> tuple[Loop, dict]:
    """The loop's parts, and its state: fresh, resumed from the session's checkpoint, or a warm start's."""
    rank, world, device = session.rank, session.world, session.device
    torch.set_num_threads(cfg.run.threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count())
    torch.manual_seed(cfg.run.seed + rank)  # the initial weights (every rank's are replaced by rank 0's under DDP)
    # The held-out sets; the training bags come from `train_batches` (Ray Data) or this rank's share below.
    data = load_dataset(cfg.data.lake, cfg.data.dataset, with_train=False, version=cfg.data.version)
    row_sparse = cfg.optim.negatives > 0 and cfg.optim.row_sparse
    model = build_model(cfg.model, data.n_items, row_sparse).to(device)
    tables = tables_of(model, row_sparse)  # exchanged row-wise, outside DDP
    lr = warm_start.base_lr(cfg)  # optim.lr, scaled down for a warm start's fine-tune
    opt = Optimizers(model, tables, cfg.optim.optimizer, lr, cfg.optim.weight_decay)
    # EMA weight averaging: evaluation, selection and export use the averaged weights (row-lazy on the tables)
    ema = WeightAverage(model, cfg.optim.ema, tables, opt.parts) if cfg.optim.ema > 0 else None
    fingerprint = data.meta["vocabulary_fingerprint"]

    state = {"step": 0, "epoch": 0, "best": -1.0, "best_epoch": 0, "bad_evals": 0, "history": [], "stopped": False,
             "resumed_from": 0}
    saved = session.restore(fingerprint)
    if saved is not None:
        state = _restore(saved, model, opt, ema)
        if rank == 0:
            log.info("resumed %s at epoch %d, step %d", cfg.run.name, state["epoch"], state["step"])
    elif cfg.run.warm_start:  # the driver's initial checkpoint: the parent's rows carried by item ID
        state = _restore(warm_start.load_initial(cfg, fingerprint), model, opt, ema)  # epoch 0
        if rank == 0:
            log.info("warm start of %s from run %s", cfg.run.name, cfg.run.warm_start)
    if world > 1 and tables:
        ignore_in_ddp(model, tables)
        broadcast_tables(tables)
    train_model = session.wrap(model)  # DDP after restoring, so every rank starts from the same weights
    if train_batches is None:
        share = load_train_share(cfg.data.lake, cfg.data.dataset, rank, world, cfg.data.version)  # 1/W of the users
        train_batches = memory_batches(share, data.meta["train"]["users"], cfg.optim.batch_size, cfg.run.seed,
                                       rank, world)
    metrics = _telemetry(cfg, rank)
    sampler = _sampler(cfg, data, rank, device) if cfg.optim.negatives > 0 else None
    passes = _passes(model, cfg.optim.alternate)
    loop = Loop(cfg=cfg, rank=rank, world=world, device=device, data=data, kind=ModelKind.of(cfg), model=model,
                train_model=train_model, eval_model=ema.module if ema is not None else model, tables=tables, opt=opt,
                ema=ema, objective=objective_for(cfg.optim.candidates, sampler), sampler=sampler,
                batches=train_batches, passes=passes,
                steps=steps_per_epoch(data.meta["train"]["users"], cfg.optim.batch_size, world) * len(passes),
                lr=lr, autocast=precision_context(cfg.run.precision, device), metrics=metrics,
                ckpt_meta=dict(config=cfg.to_dict(), n_items=data.n_items, fingerprint=fingerprint))
    return loop, state


def _sampler(cfg: Config, data: Dataset, rank: int, device: torch.device) -> NegativeSampler:
    """optim.negatives > 0: the negatives' proposal, from the items' training counts."""
    counts = item_counts(cfg.data.lake, cfg.data.dataset, cfg.data.version)
    if counts is None:  # a dataset from before train_count: count the bags (loads them on streamed workers)
        train = load_dataset(cfg.data.lake, cfg.data.dataset, version=cfg.data.version).train
        counts = train.item_counts(data.n_items)
    return NegativeSampler(counts, cfg.optim.negatives, cfg.optim.proposal_alpha, seed=cfg.run.seed + rank,
                           device=device)


def run_epoch(loop: Loop, state: dict, epoch: int) -> dict:
    """One epoch of updates (every pass of `loop.passes`), then the epoch's end: EMA flush, prototype
    re-centring. Advances state["step"]; returns the epoch's row (loss, timing, users) before validation."""
    cfg, model, device = loop.cfg, loop.model, loop.device
    t0 = time.perf_counter()
    # dropout, Gumbel, z and negative draws seeded per epoch: a run resumed at epoch e draws what an
    # uninterrupted one draws from e + 1 on, so a lost node or cluster does not change the result
    seed = epoch_seed(cfg.run.seed, loop.rank, epoch)
    torch.manual_seed(seed)
    if loop.sampler is not None:
        loop.sampler.generator.manual_seed(seed)
    if loop.kind.composite_prior:
        model.freeze_old_posterior()  # q_old of RecVAE's composite prior: the encoder as this epoch starts
    model.train()
    # running sums stay on the device: a .item() per step would stall the GPU on the host
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, nll, kl
    n_steps, n_users, exchanged, waited = 0, 0, 0, 0.0
    beta = _beta(cfg, state["step"], loop.steps)
    for frozen, dropout in loop.passes:
        model.dropout = cfg.model.dropout if dropout else 0.0
        batches = iter(loop.batches(epoch))
        if device.type == "cuda":  # page-lock the next batches off the training thread
            batches = pinned_ahead(batches)
        batches = _with_fault_injection(cfg, loop.rank, state, batches)
        while True:
            t_wait = time.perf_counter()
            batch = next(batches, None)  # time blocked on the input pipeline: the profile's data share
            waited += time.perf_counter() - t_wait
            if batch is None:
                break
            idx, off = to_device(batch[0], device), to_device(batch[1], device)
            beta = _beta(cfg, state["step"], loop.steps)
            if cfg.optim.lr_schedule != "constant":
                loop.opt.set_lr(lr_at(state["step"], loop.steps * cfg.optim.epochs, loop.lr, cfg.optim.lr_schedule))
            with tf32_scope(cfg.run.precision, device):
                loss, parts, received = train_step(loop.train_model, loop.opt, loop.tables, loop.objective, idx, off,
                                                   beta, loop.world, autocast=loop.autocast,
                                                   kl_by_items=cfg.optim.kl_by_items, frozen=frozen)
            exchanged += received
            if loop.ema is not None:
                loop.ema.update(model)
            state["step"] += 1
            n_steps, n_users = n_steps + 1, n_users + len(off) - 1
            sums += torch.stack([loss.detach(), parts["nll"], parts["kl"]]).double()
            if loop.metrics is not None:
                loop.metrics.on_step(len(off) - 1)
    model.dropout = cfg.model.dropout
    if loop.ema is not None:
        loop.ema.flush()  # the table rows no step touched lately, brought up to date for evaluation and the checkpoint
    recentre = epoch == cfg.model.proto_init_epoch or (cfg.model.proto_refine and 0 < cfg.model.proto_init_epoch < epoch)
    if loop.kind.prototypes and recentre and not warm_start.keeps_prototypes(cfg):
        _recentre_prototypes(model, cfg.run.seed, refine_only=epoch > cfg.model.proto_init_epoch, world=loop.world)
    mean_loss, mean_nll, mean_kl = (sums / max(n_steps, 1)).tolist()  # one sync per epoch
    row = {"epoch": epoch, "step": state["step"], "beta": beta, "seconds": time.perf_counter() - t0,
           "users": n_users * loop.world // len(loop.passes), "workers": loop.world,
           "resumed_from": state["resumed_from"], "loss": mean_loss, "nll": mean_nll, "kl": mean_kl,
           "input_seconds": waited}
    if loop.tables and loop.world > 1:
        row["row_exchange_mb_per_step"] = exchanged / max(n_steps, 1) / 1e6
    return row


def _report(loop: Loop, session, state: dict, row: dict, stop: bool) -> None:
    """The epoch's row into the history and to the session, with rank 0's checkpoint."""
    if loop.metrics is not None:
        loop.metrics.on_epoch(row)
    row[SCORE] = row.get("val_ndcg@100", -1.0)
    epoch = row["epoch"]
    state["epoch"] = epoch
    state["history"].append(row)
    ckpt = None
    if loop.rank == 0:
        session.settle(row)  # Ray Train: the previous checkpoint registered, so a restart redoes one epoch at most
        ckpt = checkpoint.to_bytes(
            model=loop.model, optimizer=loop.opt, step=state["step"], epoch=epoch,
            extra={k: state[k] for k in ("best", "best_epoch", "bad_evals", "history")}
            | {"ema": loop.ema.state_dict() if loop.ema is not None else None, "stopped": stop}, **loop.ckpt_meta)
    session.report(row, ckpt, state["history"], ended=stop or epoch == loop.cfg.optim.epochs)


def _with_fault_injection(cfg: Config, rank: int, state: dict, batches: Iterator) -> Iterator:
    """run.fail_at_step (fault tests): SIGKILL rank run.fail_rank when it is about to take that step, as when
    a node is lost, the first time only. Otherwise the batches pass through untouched."""
    if cfg.run.fail_at_step < 0 or rank != cfg.run.fail_rank:
        return batches

    def watched():
        for batch in batches:
            if state["step"] == cfg.run.fail_at_step and _first_failure(cfg):
                print(f"[macrid] run.fail_at_step: killing rank {rank} at step {state['step']}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)  # a dead worker, as when a node is lost
            yield batch
    return watched()


def _beta(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """β of update `step`: annealed from 0 (Eq. 5), or at its cap from the first step of a warm start, whose
    parent's posterior is already trained."""
    if cfg.run.warm_start:
        return cfg.optim.beta
    return beta_at(step, steps_per_epoch, cfg.optim.beta, cfg.optim.anneal_epochs, cfg.optim.anneal)


def _passes(model, alternate: int) -> list[tuple[tuple, bool]]:
    """An epoch's passes over the training users: (the parameters a pass leaves frozen, input dropout on).

    optim.alternate = N > 0 (RecVAE): N encoder passes with dropout, then one decoder pass without it."""
    if not alternate:
        return [((), True)]
    decoder = tuple(p for name in model.decoder_params if (p := getattr(model, name, None)) is not None)
    encoder = tuple(p for p in model.parameters() if not any(p is d for d in decoder))
    return [(decoder, True)] * alternate + [(encoder, False)]


def steps_per_epoch(n_users: int, batch_size: int, world: int) -> int:
    """Optimizer steps in one epoch: each of W ranks takes n_users // W users, batch_size // W per step (memory
    input, memory_batches; Ray Data's equal split gives the same). With W = 1: ceil(N / B)."""
    return math.ceil((n_users // world) / max(1, batch_size // world))


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """A 63-bit seed of its own for each (run seed, rank, epoch)."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _validate(cfg: Config, data: Dataset, eval_model, epoch: int, row: dict, state: dict) -> bool:
    """Rank 0: evaluate when due and track the best epoch; returns whether patience ran out."""
    if not (epoch % cfg.run.eval_every == 0 or epoch == cfg.optim.epochs):
        return False
    val = evaluate(model_ranker(eval_model, data.n_items), data.val, data.n_items, max_users=cfg.run.eval_users,
                   seed=cfg.run.seed)
    row["val_ndcg@100"] = val["ndcg@100"][0]
    if "independence" in val:  # Sec. 3.4 on the validation users' representations (sweeps plot it, Fig. 4)
        row["val_independence"] = val["independence"]
    if row["val_ndcg@100"] > state["best"]:
        state.update(best=row["val_ndcg@100"], best_epoch=epoch, bad_evals=0)
    else:
        state["bad_evals"] += 1
    return bool(cfg.run.patience and state["bad_evals"] >= cfg.run.patience)


def _restore(saved: dict, model, opt, ema) -> dict:
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    extra = saved["extra"]
    if ema is not None and extra.get("ema") is not None:
        ema.load_state_dict(extra["ema"])
    # resumed_from: the epoch this worker group starts from (what a restart redid is measured by it)
    return {"step": saved["step"], "epoch": saved["epoch"], "resumed_from": saved["epoch"],
            "stopped": bool(extra.get("stopped", False)),
            **{k: extra[k] for k in ("best", "best_epoch", "bad_evals", "history")}}


def run_in_process(cfg: Config, on_report: Callable[[dict], None] | None = None) -> dict:
    """Train in this process (no Ray) and finish the run; returns metrics.json. Resumes when run.resume is set."""
    has_run(cfg)
    cfg, meta = pin_run(cfg, "in-process")
    warm_start.prepare_warm_start(cfg, meta)
    fingerprint = meta["vocabulary_fingerprint"]
    session = LocalSession(run_uri(cfg), cfg.run.device, on_report)
    history = fit(cfg, session)
    return finish(cfg, session.best_checkpoint(fingerprint), history, session.device)


def eval_weights(saved: dict) -> dict:
    """The weights evaluation uses: the EMA average when the run kept one, else the trained weights."""
    ema = saved["extra"].get("ema")
    if ema is None:
        return saved["model"]
    return {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}


def finish(cfg: Config, best: dict, history: list[dict], device: torch.device | str = "cpu",
           ray_task_gpus: list | None = None) -> dict:
    """Score the best checkpoint on validation and test; write metrics.json, the learning curve and model.pt.
    metrics["scored_on"] says where: {"device": ...}, and the Ray task's GPUs when a task scored it."""
    out = run_uri(cfg)
    data = load_dataset(cfg.data.lake, cfg.data.dataset, with_train=False, version=cfg.data.version)
    model = build_model(cfg.model, data.n_items).to(device)
    weights = eval_weights(best)
    model.load_state_dict(weights)
    checkpoint.save(f"{out}/{MODEL_FILE}", model=model, step=best["step"], epoch=best["epoch"],
                    config=best["config"], n_items=best["n_items"], fingerprint=best["vocabulary_fingerprint"])
    val, test = (evaluate(model_ranker(model, data.n_items), split, data.n_items, max_users=cfg.run.eval_users,
                          seed=cfg.run.seed) for split in (data.val, data.test))
    epoch_secs = [h["seconds"] for h in history]
    metrics = {
        "run": cfg.run.name, "dataset": cfg.data.dataset, "model": cfg.model.name, "config": cfg.to_dict(),
        "best_epoch": best["epoch"], "epochs_run": len(history), "train_seconds": float(sum(epoch_secs)),
        "median_epoch_seconds": float(np.median(epoch_secs)), "val": val, "test": test, "history": history,
        "vocabulary_fingerprint": data.meta["vocabulary_fingerprint"],
        "scored_on": {"device": str(device)} | ({"ray_task_gpus": ray_task_gpus} if ray_task_gpus is not None else {}),
    }
    record = lake.join(out, RUN_FILE)
    if cfg.run.warm_start and lake.exists(record):  # the lineage the driver recorded when it built the start
        metrics["parent"] = lake.read_json(record).get("parent")
    lake.write_json(f"{out}/{METRICS_FILE}", metrics)
    with tempfile.TemporaryDirectory() as tmp:
        plot_learning_curve(history, f"{tmp}/curve.png", f"{cfg.run.name} ({cfg.model.name})")
        lake.write_bytes(f"{out}/learning_curve.png", Path(tmp, "curve.png").read_bytes())
    print(f"[macrid] best epoch {best['epoch']}  val: {format_metrics(val)}", flush=True)
    print(f"[macrid] test: {format_metrics(test)}", flush=True)
    print(f"[macrid] run folder: {out}", flush=True)
    return metrics


def memory_batches(share: CSR, n_users: int, batch_size: int, seed: int, rank: int, world: int) -> BatchSource:
    """In-memory batches from this rank's share (rows rank, rank + W, ... of the train table).

    Every epoch each rank permutes its share with a seed of its own and takes batch_size // W users
    per step. Ranks hold n_users // W or one more; each uses n_users // W of them per epoch (a different
    one left out each epoch), so every rank runs the same number of steps, as DDP requires. With one
    worker this is the whole training set in a fresh permutation per epoch.
    """
    per_rank, use = batch_size // world, n_users // world

    def batches(epoch: int):
        rng = np.random.default_rng([seed, epoch] + ([rank] if world > 1 else []))
        order = rng.permutation(share.n_rows)[:use]
        for start in range(0, use, per_rank):
            yield share.take(order[start:start + per_rank])
    return batches


@torch.no_grad()
def _recentre_prototypes(model, seed: int, refine_only: bool, world: int = 1) -> None:
    """model.proto_init_epoch / proto_refine: prototypes to spherical k-means centres of h (k-means++ at the
    init epoch, one Lloyd step from the current prototypes after it).

    Computed on rank 0 and broadcast: on CUDA, k-means' index_add_ uses atomics, so ranks would get slightly
    different centres, and DDP never re-broadcasts parameters, so the replicas would drift apart."""
    if world == 1 or torch.distributed.get_rank() == 0:
        h = model.h.detach()
        # (K, D) unit norm; cosines ignore the scale
        centres = prototypes.refine(h, model.m.detach()) if refine_only else \
            prototypes.spherical_kmeans(h, model.K, seed)
        model.m.copy_(centres.to(model.m.device, model.m.dtype) * model.m.norm(dim=1, keepdim=True).mean())
    if world > 1:
        torch.distributed.broadcast(model.m.data, src=0)


def _agree(stop: bool, world: int, device: torch.device) -> bool:
    """Rank 0's stop decision, broadcast (on the device: NCCL takes no CPU tensors) so all ranks stop together."""
    if world == 1:
        return stop
    flag = torch.tensor([int(stop)], device=device)
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


def _telemetry(cfg: Config, rank: int):
    if not cfg.run.metrics_port:
        return None

    return TrainMetrics(cfg.run.metrics_port + rank, cfg.run.name, rank, cfg.run.metrics_host)


def _first_failure(cfg: Config) -> bool:
    """True only the first time: a marker in the run folder records that the failure was injected."""
    marker = lake.join(run_uri(cfg), "_fault_injected")
    if lake.exists(marker):
        return False
    lake.write_bytes(marker, b"1")
    return True


def _progress(total: int, initial: int, enabled: bool, desc: str):
    return tqdm(total=total, initial=initial, desc=desc, unit="epoch", disable=not enabled, file=sys.stdout,
                ncols=110, mininterval=1.0)


