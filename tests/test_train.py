"""End to end: real training on ml-100k in-process, and the Ray Train worker on synthetic data."""

import math
import json
import os
from pathlib import Path

import numpy as np
import pytest

from macrid.model.baselines import popularity_scorer
from macrid.data.batches import load_dataset
from macrid.config import load_config
from macrid.training.evaluate import evaluate, scores_ranker
from macrid.training.train import run_in_process


@pytest.mark.slow
def test_few_epochs_on_ml100k_beat_popularity_clearly(ml100k_lake):
    cfg = load_config(None, [f"data.lake={ml100k_lake!r}", "data.dataset='ml-100k'", "run.name='e2e'",
                             "optim.epochs=8", "optim.batch_size=100", "run.progress=false"])
    metrics = run_in_process(cfg)
    data = load_dataset(ml100k_lake, "ml-100k")
    pop = evaluate(scores_ranker(popularity_scorer(data.train, data.n_items)), data.val, data.n_items)["ndcg@100"][0]
    ours = metrics["val"]["ndcg@100"][0]
    assert ours > pop + 0.05, (ours, pop)
    run = os.path.join(ml100k_lake, "runs", "e2e")
    assert os.path.exists(f"{run}/learning_curve.png")
    assert os.path.exists(f"{run}/checkpoints/best.pt") and os.path.exists(f"{run}/checkpoints/latest.pt")
    on_disk = json.load(open(f"{run}/metrics.json"))
    assert on_disk["best_epoch"] == metrics["best_epoch"] and len(on_disk["history"]) == 8
    assert set(on_disk["test"]) >= {"ndcg@100", "recall@20", "recall@50", "independence"}
    # the model is rebuilt from its run folder alone and scores exactly what the run reported
    from macrid.training.evaluate import model_ranker
    from macrid.training.checkpoint import load_model

    model, _ = load_model(run, data.meta["vocabulary_fingerprint"])
    again = evaluate(model_ranker(model, data.n_items), data.test, data.n_items)["ndcg@100"]
    assert again == pytest.approx(metrics["test"]["ndcg@100"])


@pytest.mark.parametrize("model", ["multvae", "multdae"])
def test_baselines_train_in_the_same_harness(synthetic_lake, model):
    cfg = load_config(None, [f"data.lake={synthetic_lake!r}", f"model.name={model!r}", f"run.name='{model}'",
                             "optim.epochs=15", "optim.batch_size=64", "run.progress=false", "model.D=16",
                             "model.hidden=16"])
    metrics = run_in_process(cfg)
    data = load_dataset(synthetic_lake, "synthetic")
    pop = evaluate(scores_ranker(popularity_scorer(data.train, data.n_items)), data.val, data.n_items)["ndcg@100"][0]
    assert metrics["model"] == model and metrics["history"][-1]["nll"] < metrics["history"][0]["nll"]
    assert metrics["val"]["ndcg@100"][0] > pop, (metrics["val"]["ndcg@100"][0], pop)


def test_ray_train_worker_runs_the_loop(synthetic_lake):
    import ray

    from macrid.training.launch import launch

    cfg = load_config(None, [f"data.lake={synthetic_lake!r}", "run.name='ray'", "optim.epochs=2",
                             "model.K=4", "model.D=16", "run.progress=false"])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2)
    try:
        metrics = launch(cfg)
    finally:
        ray.shutdown()
    assert metrics["epochs_run"] == 2 and metrics["run"] == "ray"
    assert os.path.exists(os.path.join(synthetic_lake, "runs", "ray", "learning_curve.png"))


def test_a_gpu_run_whose_driver_has_no_gpu_is_scored_in_a_one_gpu_ray_task(synthetic_lake):
    """A CPU-only head: the run trained on GPU workers, the driver has none, so validation and test are scored in
    a Ray task holding one GPU. A local Ray declaring one logical GPU stands in for the cluster's; the task finds
    no CUDA there and scores on its CPU, to the same figures as the driver's own CPU finish."""
    import ray

    from macrid.training import checkpoint
    from macrid.training.launch import finish_on_the_training_device

    sets = [f"data.lake={synthetic_lake!r}", "run.name='gpu-finish'", "optim.epochs=1", "model.K=4", "model.D=16",
            "run.progress=false"]
    on_cpu = run_in_process(load_config(None, sets))
    assert on_cpu["scored_on"] == {"device": "cpu"}
    best = checkpoint.load(f"{synthetic_lake}/runs/gpu-finish/checkpoints/best.pt", on_cpu["vocabulary_fingerprint"])
    ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, object_store_memory=100 * 1024**2)
    try:
        in_task = finish_on_the_training_device(load_config(None, sets + ["run.use_gpu=true"]), best,
                                                on_cpu["history"])
    finally:
        ray.shutdown()
    assert in_task["scored_on"]["device"] == "cpu" and len(in_task["scored_on"]["ray_task_gpus"]) == 1
    assert (in_task["val"], in_task["test"]) == (on_cpu["val"], on_cpu["test"])


def test_a_run_resumed_from_a_checkpoint_ends_where_the_uninterrupted_run_ends(synthetic_lake):
    """Dropout, the Gumbel sample, z sampling and negative draws all on: 2 epochs, then --resume to 4, against
    4 epochs straight. What a lost node or cluster must not change: every epoch's loss and the final weights."""
    import torch

    from macrid.training import checkpoint

    def cfg(name, epochs, *extra):
        return load_config(None, [f"data.lake={synthetic_lake!r}", f"run.name={name!r}", f"optim.epochs={epochs}",
                                  "model.K=3", "model.D=8", "optim.negatives=64", "model.dropout=0.5",
                                  # one thread: with several, some CPU kernels' reductions split work by timing,
                                  # and a loaded machine (CI, xdist) then changes the last bits
                                  "run.threads=1", "run.progress=false", *extra])

    straight = run_in_process(cfg("straight", 4))
    run_in_process(cfg("cut", 2))
    resumed = run_in_process(cfg("cut", 4, "run.resume=true"))
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    weights = [checkpoint.load(os.path.join(synthetic_lake, "runs", r, "checkpoints", "latest.pt"))["model"]
               for r in ("straight", "cut")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_cosine_schedule_sets_the_learning_rate_of_every_update(synthetic_lake):
    from macrid.training import checkpoint

    epochs, batch = 3, 500
    cfg = load_config(None, [f"data.lake={synthetic_lake!r}", "run.name='cosine'", f"optim.epochs={epochs}",
                             f"optim.batch_size={batch}", "optim.lr=0.004", "optim.lr_schedule='cosine'",
                             "model.D=8", "model.K=3", "run.progress=false"])
    run_in_process(cfg)
    saved = checkpoint.load(os.path.join(synthetic_lake, "runs", "cosine", "checkpoints", "latest.pt"))
    users = load_dataset(synthetic_lake, "synthetic").meta["train"]["users"]
    total = epochs * -(-users // batch)  # updates in the run
    last = total - 1  # the last update's lr, restated: 0.004 * (1 + cos(pi * last / total)) / 2
    assert saved["step"] == total
    for part in saved["optimizer"]["parts"]:
        assert part["param_groups"][0]["lr"] == pytest.approx(0.004 * (1 + math.cos(math.pi * last / total)) / 2)


@pytest.mark.parametrize("n_users,batch,world", [(1000, 500, 3), (1000, 300, 3), (480, 100, 2), (7, 5, 1),
                                                  (600, 150, 4)])
def test_an_epoch_has_the_steps_every_rank_takes_at_any_worker_count(n_users, batch, world):
    """The LR and beta schedules count steps_per_epoch; every rank's memory_batches yields exactly that many
    (counted, not computed). With 3 workers, 1000 users and batch 500 a rank takes 333 users 166 at a time: 3
    steps, where ceil(1000 / 500) = 2 had cosine LR reach 0 after two thirds of the run."""
    from macrid.data.batches import CSR
    from macrid.training.train import memory_batches, steps_per_epoch

    for rank in range(world):
        rows = len(range(rank, n_users, world))  # rank r holds rows r, r + W, ...
        share = CSR(np.arange(rows + 1, dtype=np.int64), np.zeros(rows, dtype=np.int64))
        counted = sum(1 for _ in memory_batches(share, n_users, batch, 0, rank, world)(1))
        assert counted == steps_per_epoch(n_users, batch, world), (rank, counted)


def test_a_resumed_run_that_stopped_on_patience_stops_at_once(synthetic_lake):
    """A run whose validation never improves (lr 1e-12) stops on patience at epoch 2; started again with
    --resume and more epochs (a RayJob retry), it trains no further and keeps its best model."""
    from macrid.training import checkpoint

    def cfg(epochs, *extra):
        return load_config(None, [f"data.lake={synthetic_lake!r}", "run.name='patient'", f"optim.epochs={epochs}",
                                  "optim.lr=1e-12", "run.patience=1", "model.K=3", "model.D=8", "run.progress=false",
                                  *extra])

    first = run_in_process(cfg(6))
    assert first["epochs_run"] == 2 and first["best_epoch"] == 1
    best = checkpoint.load(os.path.join(synthetic_lake, "runs", "patient", "checkpoints", "best.pt"))
    again = run_in_process(cfg(10, "run.resume=true"))
    assert again["epochs_run"] == 2 and again["best_epoch"] == 1
    latest = checkpoint.load(os.path.join(synthetic_lake, "runs", "patient", "checkpoints", "latest.pt"))
    assert latest["epoch"] == 2 and latest["step"] == 2 * best["step"]  # two epochs of equal steps, no more
    assert checkpoint.load(os.path.join(synthetic_lake, "runs", "patient", "checkpoints", "best.pt"))["epoch"] == 1


@pytest.mark.parametrize("model", ["macridvae", "multvae"])
def test_alternating_updates_move_only_their_half_and_count_every_pass(synthetic_lake, model, monkeypatch):
    """optim.alternate = 2: per epoch two encoder passes (decoder frozen), then one decoder pass (encoder frozen)."""
    import torch

    from macrid.model.row_sparse import Optimizers
    from macrid.model.vae import build_model
    from macrid.training.step import FullSoftmax, train_step
    from macrid.training.train import _passes

    cfg = load_config(None, [f"data.lake={synthetic_lake!r}", f"model.name={model!r}", "model.D=8", "model.K=3"])
    data = load_dataset(synthetic_lake, "synthetic")
    net = build_model(cfg.model, data.n_items)
    passes = _passes(net, 2)
    decoder_names = {"h", "m"} if model == "macridvae" else {"h", "h_bias"}
    assert [dropout for _, dropout in passes] == [True, True, False]  # the decoder pass reads undropped input
    names = {id(p): n for n, p in net.named_parameters()}
    assert {names[id(p)] for p in passes[0][0]} == decoder_names  # frozen in the encoder passes
    assert {names[id(p)] for p in passes[2][0]} == set(names.values()) - decoder_names
    idx, off = data.train.take(np.arange(20))
    for frozen, _ in (passes[0], passes[2]):
        opt = Optimizers(net, [], "adam", 1e-2, 0.0)
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        train_step(net, opt, [], FullSoftmax(), idx, off, 0.2, 1, frozen=frozen)
        still = {names[id(p)] for p in frozen}
        for n, p in net.named_parameters():
            assert torch.equal(p, before[n]) == (n in still), n

    # the loop itself: every step of fit records (how many parameters it freezes, the model's input dropout)
    from macrid.training import train as loop

    seen, real_step = [], loop.train_step

    def recording_step(net, *args, frozen=(), **kw):
        seen.append((len(frozen), net.dropout))
        return real_step(net, *args, frozen=frozen, **kw)

    monkeypatch.setattr(loop, "train_step", recording_step)
    epochs, batch = 2, 500
    cfg = load_config(None, [f"data.lake={synthetic_lake!r}", f"run.name='alt-{model}'", f"optim.epochs={epochs}",
                             f"model.name={model!r}", f"optim.batch_size={batch}", "optim.alternate=2",
                             "model.D=8", "model.K=3", "run.progress=false", "model.dropout=0.4"])
    metrics = run_in_process(cfg)
    users = data.meta["train"]["users"]
    steps = -(-users // batch)  # per pass
    assert metrics["history"][-1]["step"] == epochs * 3 * steps  # 3 passes per epoch
    n_dec, n_enc = len(passes[0][0]), len(passes[2][0])
    one_epoch = [(n_dec, 0.4)] * (2 * steps) + [(n_enc, 0.0)] * steps  # encoder passes, then the decoder's
    assert seen == one_epoch * epochs
    assert metrics["history"][-1]["users"] == users


def test_baselines_job_writes_popularity_and_the_ease_chosen_on_validation(synthetic_lake):
    """jobs/baselines.py end to end: both metrics.json files, EASE's lambda the best of its validation sweep."""
    import runpy

    baselines = runpy.run_path(str(Path(__file__).resolve().parents[1] / "jobs" / "baselines.py"))
    assert baselines["main"](["--lake", synthetic_lake, "--dataset", "synthetic", "--lams", "1,30,3000"]) == 0
    runs = Path(synthetic_lake) / "runs"
    ease = json.loads((runs / "synthetic-ease" / "metrics.json").read_text())
    pop = json.loads((runs / "synthetic-popularity" / "metrics.json").read_text())
    assert set(ease["sweep"]) == {"1.0", "30.0", "3000.0"}
    assert ease["lam"] == float(max(ease["sweep"], key=ease["sweep"].get))
    assert ease["val"]["ndcg@100"][0] == max(ease["sweep"].values())
    assert ease["test"]["ndcg@100"][0] > pop["test"]["ndcg@100"][0]  # the planted structure beats popularity
