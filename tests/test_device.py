"""Device correctness without a GPU, and the bf16 path.

The default device is switched to `meta` while the model and the batch live on the CPU explicitly.
A tensor created without `device=` (the bug that breaks GPU workers: `torch.zeros(B, K)` next to
CUDA weights) then lands on meta, and the first operation that mixes it with the CPU tensors fails,
exactly as a CPU tensor mixed with CUDA tensors fails on a GPU worker.
"""

import contextlib

import numpy as np
import pytest
import torch

from macrid.data.batches import CSR, iter_batches
from macrid.config import ModelConfig
from macrid.training.evaluate import evaluate, model_ranker
from macrid.data.batches import HeldOut
from macrid.model.vae import build_model
from macrid.model.row_sparse import Optimizers, tables_of
from macrid.model.sampling import NegativeSampler
from macrid.training.step import objective_for, precision_context, train_step

CPU = torch.device("cpu")
M = 40


@contextlib.contextmanager
def default_device_meta():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def bags(n_users: int, seed: int) -> CSR:
    rng = np.random.default_rng(seed)
    rows = [np.sort(rng.choice(M, rng.integers(3, 9), replace=False)) for _ in range(n_users)]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    return CSR(indptr, np.concatenate(rows).astype(np.int64))


def step_setup(name: str, sampled: bool):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, K=3, D=8, hidden=8), M, row_sparse=sampled).to(CPU)
    tables = tables_of(model, sampled)
    opt = Optimizers(model, tables, "adam", 1e-2, 0.0)
    sampler = NegativeSampler(np.arange(M), 15, 0.5, seed=1, device=CPU) if sampled else None
    idx, off = next(iter_batches(bags(12, 0), 12))
    return model, opt, tables, sampler, idx, off


def test_the_guard_catches_a_tensor_created_without_a_device():
    x = torch.ones(3, device=CPU)
    with default_device_meta(), pytest.raises(RuntimeError, match="device"):
        x.index_add(0, torch.arange(3, device=CPU), torch.zeros(3))  # torch.zeros without device=


@pytest.mark.parametrize("name,mode", [("macridvae", "full"), ("macridvae", "batch"), ("macridvae", "user"),
                                       ("multvae", "full"), ("multdae", "full"), ("multvae", "batch")])
def test_training_step_creates_every_tensor_on_the_models_device(name, mode):
    model, opt, tables, sampler, idx, off = step_setup(name, mode != "full")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with default_device_meta():
        loss, parts, _ = train_step(model, opt, tables, objective_for(mode, sampler), idx, off, beta=0.2,
                                    world=1)
    assert loss.device == CPU and parts["nll"].device == CPU and torch.isfinite(loss)
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert moved, "the step changed no weight"


@pytest.mark.parametrize("name", ["macridvae", "multvae"])
def test_evaluation_creates_every_tensor_on_the_models_device(name):
    model, *_ = step_setup(name, False)
    split = HeldOut(np.arange(10), bags(10, 1), bags(10, 2))
    with default_device_meta():
        result = evaluate(model_ranker(model, M), split, M, batch_size=4)
    assert 0.0 <= result["ndcg@100"][0] <= 1.0 and result["users"] == 10


def test_bf16_step_tracks_the_fp32_step():
    """bf16 autocast rounds the matmul operands only: loss and gradients stay close to fp32's."""
    losses, grads = [], []
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(K=3, D=16, dropout=0.0, gumbel=False, sample=False), M).to(CPU)
        opt = Optimizers(model, [], "sgd", 1e-9, 0.0)
        idx, off = next(iter_batches(bags(32, 3), 32))
        loss, _, _ = train_step(model, opt, [], objective_for("batch", None), idx, off, beta=0.2, world=1,
                                autocast=precision_context(precision, CPU))
        losses.append(loss.item())
        grads.append(model.h.grad.flatten().clone())
        assert loss.dtype == torch.float32  # the loss is fp32 whatever the precision
    assert abs(losses[1] - losses[0]) / abs(losses[0]) < 0.01, losses
    cosine = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cosine > 0.99, cosine
    assert not torch.equal(grads[0], grads[1])  # bf16 really ran


def test_the_export_computation_creates_every_tensor_on_the_models_device():
    from macrid.output import represent

    torch.manual_seed(0)
    model = build_model(ModelConfig(K=3, D=8, item_bias=True), M).to(CPU).eval()
    idx, off = next(iter_batches(bags(12, 0), 12))
    with default_device_meta():
        out = represent.users(model, idx.to(CPU), off.to(CPU), top_n=5)
        c, h, bias = represent.items(model, 0, M)
    for t in (out.mu, out.share, out.top_items, out.top_scores, out.top_concepts, c, h, bias):
        assert t.device == CPU


# --- the virtual accelerator (tests/device_guard.py): tensors made explicitly on the CPU are caught too ---

def test_the_virtual_accelerator_catches_explicit_cpu_tensors_and_allows_derived_ones():
    from device_guard import VIRTUAL, VirtualAccelerator, on_virtual

    with VirtualAccelerator():
        x = torch.ones(3, device=VIRTUAL)
        for planted in (lambda: torch.zeros(3, device="cpu"), lambda: torch.from_numpy(np.zeros(3, np.float32)),
                        lambda: torch.tensor([0.0, 1.0, 2.0])):
            with pytest.raises(RuntimeError, match="mixes tensors on the worker's device with a CPU tensor"):
                x + planted()
        assert x.device == VIRTUAL and on_virtual(x + torch.zeros(3, device=x.device))
        assert on_virtual(x * torch.tensor(2.0))  # a 0-d CPU tensor may mix, as with CUDA
        assert not on_virtual(x.cpu()) and on_virtual(x.cpu().to(VIRTUAL))


def virtual_step_setup(name: str, sampled: bool):
    from device_guard import VIRTUAL

    from macrid.data.bags import to_device

    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, K=3, D=8, hidden=8), M, row_sparse=sampled).to(VIRTUAL)
    tables = tables_of(model, sampled)
    opt = Optimizers(model, tables, "adam", 1e-2, 0.0)
    sampler = NegativeSampler(np.arange(M), 15, 0.5, seed=1, device=VIRTUAL) if sampled else None
    idx, off = next(iter_batches(bags(12, 0), 12))  # host tensors, as the input pipeline gives them
    return model, opt, tables, sampler, to_device(idx, VIRTUAL), to_device(off, VIRTUAL)


@pytest.mark.parametrize("name,mode", [("macridvae", "full"), ("macridvae", "batch"), ("macridvae", "user"),
                                       ("multvae", "full"), ("multdae", "full"), ("multvae", "batch")])
def test_training_steps_keep_every_tensor_on_the_virtual_accelerator(name, mode):
    from device_guard import VirtualAccelerator, on_virtual

    with VirtualAccelerator():
        model, opt, tables, sampler, idx, off = virtual_step_setup(name, mode != "full")
        for _ in range(2):  # the second step runs on optimizer state made by the first
            loss, parts, _ = train_step(model, opt, tables, objective_for(mode, sampler), idx, off, beta=0.2,
                                        world=1)
        assert on_virtual(loss) and all(on_virtual(p) for p in model.parameters())


def test_the_virtual_accelerator_catches_a_planted_host_tensor_in_the_step(monkeypatch):
    """A sampler that draws with numpy (a plausible slip) breaks on a GPU; the guard says so on the CPU."""
    from device_guard import VirtualAccelerator

    def numpy_draws(self):
        return torch.from_numpy(np.random.default_rng(0).integers(0, M, self.n_samples))

    with VirtualAccelerator():
        model, opt, tables, sampler, idx, off = virtual_step_setup("macridvae", True)
        monkeypatch.setattr(NegativeSampler, "sample", numpy_draws)
        with pytest.raises(RuntimeError, match="mixes tensors on the worker's device"):
            train_step(model, opt, tables, objective_for("batch", sampler), idx, off, beta=0.2, world=1)


def test_multi_chunk_top_k_on_the_virtual_accelerator_equals_full_scores():
    """Chunks of 7 items (6 chunks, the last one short), ties included, fold-in items excluded."""
    from device_guard import VirtualAccelerator

    from macrid.training.evaluate import chunked_top_k
    from macrid.training.metrics import top_k

    with VirtualAccelerator():
        model, *_, idx, off = virtual_step_setup("macridvae", False)
        model.eval()
        with torch.no_grad():
            model.h.data[5:20] = model.h.data[4]  # 16 items with equal scores: ties across chunk borders
            got, _ = chunked_top_k(model, idx, off, M, 25, chunk=7)
            scores = model.score(model.represent(idx, off), torch.arange(M, device=idx.device)).float().cpu()
    idx, off = idx.cpu(), off.cpu()
    rows = torch.repeat_interleave(torch.arange(len(off) - 1), off.diff())
    scores[rows, idx] = -torch.inf
    assert torch.equal(got.cpu(), top_k(scores, 25))


@pytest.mark.parametrize("extra", [
    ["optim.ema=0.9", "model.proto_init_epoch=1", "model.proto_refine=true", "model.item_bias=true",
     "model.encoder_layers=1"],
    ["model.prior='composite'", "optim.alternate=1"],
    ["optim.negatives=30", "optim.row_sparse=true", "optim.ema=0.5"],
], ids=["ema-prototypes-bias-layers", "composite-alternate", "sampled-row-sparse-ema"])
def test_fit_and_finish_keep_every_tensor_on_the_virtual_accelerator(synthetic_lake, monkeypatch, extra):
    """The whole in-process run (fit: EMA, prototype re-centring, the composite prior, the item bias, an
    encoder layer, sampled softmax; validation; finish) with the session's device the virtual one."""
    from device_guard import VIRTUAL, VirtualAccelerator

    from macrid.config import load_config
    from macrid.training import session
    from macrid.training.train import run_in_process

    monkeypatch.setattr(session, "resolve_device", lambda name: VIRTUAL)
    cfg = load_config(None, [f"data.lake={synthetic_lake!r}", "data.dataset='synthetic'", "run.progress=false",
                             f"run.name='virtual-{abs(hash(tuple(extra)))}'", "model.K=3", "model.D=8",
                             "optim.epochs=2", "optim.batch_size=200", *extra])
    with VirtualAccelerator():
        metrics = run_in_process(cfg)
    assert metrics["epochs_run"] == 2 and 0 < metrics["val"]["ndcg@100"][0] <= 1


def test_pinned_ahead_gives_the_same_batches_in_order_and_raises_where_the_input_failed():
    from macrid.data.bags import pinned_ahead

    made = [(torch.arange(i, i + 3), torch.tensor([0, 3])) for i in range(7)]
    got = list(pinned_ahead(iter(made), pin=False))
    assert len(got) == 7 and all(torch.equal(a[0], b[0]) for a, b in zip(got, made, strict=True))

    def failing():
        yield made[0]
        raise OSError("shard 3 is unreadable")

    it = pinned_ahead(failing(), pin=False)
    assert torch.equal(next(it)[0], made[0][0])
    with pytest.raises(OSError, match="shard 3"):
        next(it)
    partial = pinned_ahead(iter(made), pin=False)
    next(partial)
    partial.close()  # a consumer that stops early (patience) does not leave the thread blocked
