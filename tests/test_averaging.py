"""The weight average (optim.ema): row-lazy on the row-sparse tables, yet the exact EMA whenever it is read.

The expectation is the EMA restated here, dense, over every parameter after every step:
a_1 = p_1, a_t = d * a_{t-1} + (1 - d) * p_t. It is run beside the real optimizer steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from macrid.model.row_sparse import Optimizers, tables_of
from macrid.model.sampling import NegativeSampler
from macrid.model.vae import MacridVAE
from macrid.training.averaging import WeightAverage
from macrid.training.step import objective_for, train_step

M, DECAY = 400, 0.8


def bags(rng, users=12, per_user=5, items=M // 4):
    """A batch whose users hold items of the first quarter only, so most rows stay untouched for many steps."""
    rows = [np.sort(rng.choice(items, per_user, replace=False)) for _ in range(users)]
    idx = torch.as_tensor(np.concatenate(rows), dtype=torch.long)
    off = torch.as_tensor(np.arange(users + 1) * per_user, dtype=torch.long)
    return idx, off


def setup(seed=0, optimizer="adam"):
    torch.manual_seed(seed)
    model = MacridVAE(M, K=3, D=6, row_sparse=True)
    tables = tables_of(model, True)
    opt = Optimizers(model, tables, optimizer, 0.05, 0.0)
    sampler = NegativeSampler(np.ones(M), 6, 0.0, seed=seed)  # 6 negatives a step: a few rows of 400
    return model, tables, opt, sampler


def dense_ema(reference, model, step):
    """The formula, on every parameter."""
    for name, p in model.named_parameters():
        reference[name] = p.detach().clone() if step == 1 else DECAY * reference[name] + (1 - DECAY) * p.detach()


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_the_lazy_average_equals_the_dense_formula_and_leaves_untouched_rows_alone(optimizer):
    model, tables, opt, sampler = setup(optimizer=optimizer)
    ema = WeightAverage(model, DECAY, tables, opt.parts)
    rng, reference = np.random.default_rng(1), {}
    for step in range(1, 31):
        idx, off = bags(rng)
        h_before = ema.module.h.detach().clone()
        frozen = (model.h,) if step % 7 == 0 else ()  # optim.alternate: a frozen table is not touched at all
        train_step(model, opt, tables, objective_for("batch", sampler), idx, off, 0.2, 1, frozen=frozen)
        ema.update(model)
        dense_ema(reference, model, step)
        if step > 1:
            # only the rows of h this step changed are written; the others are bit-identical in the average
            touched = torch.zeros(M, dtype=torch.bool)
            if not frozen:
                touched[rows_changed(model)] = True
            assert torch.equal(ema.module.h.detach()[~touched], h_before[~touched])
            assert (~touched).sum() > M // 2  # the lazy case is the common one
            torch.testing.assert_close(ema.module.h.detach()[touched], reference["h"][touched], rtol=1e-5, atol=1e-6)
    ema.flush()
    for name, p in ema.module.named_parameters():
        torch.testing.assert_close(p.detach(), reference[name], rtol=1e-5, atol=1e-6, msg=name)


def rows_changed(model):
    """The rows of h that the last optimizer step changed: those of its sparse gradient."""
    return model.h.grad.coalesce().indices()[0]


def test_a_saved_average_resumes_to_the_same_weights_as_an_unbroken_one():
    model, tables, opt, sampler = setup()
    ema = WeightAverage(model, DECAY, tables, opt.parts)
    rng, reference = np.random.default_rng(2), {}
    for step in range(1, 21):
        train_step(model, opt, tables, objective_for("batch", sampler), *bags(rng), 0.2, 1)
        ema.update(model)
        dense_ema(reference, model, step)
        if step == 10:  # a checkpoint, then a fresh process: a new average loads it
            saved = ema.state_dict()
            assert int(saved["n_averaged"]) == 10 and all(k.startswith("module.") for k in saved if k != "n_averaged")
            ema = WeightAverage(model, DECAY, tables, [])
            ema.load_state_dict(saved)
            for part in opt.parts:  # the hooks of the first average are dropped with a fresh optimizer in a real resume
                part._optimizer_step_pre_hooks.clear()
                part.register_step_pre_hook(ema._before_step)
    ema.flush()
    for name, p in ema.module.named_parameters():
        torch.testing.assert_close(p.detach(), reference[name], rtol=1e-5, atol=1e-6, msg=name)


def test_without_tables_it_is_torchs_averaged_model():
    """Full softmax (no row-sparse tables): the same numbers as torch's AveragedModel with the EMA function."""
    torch.manual_seed(3)
    model = MacridVAE(M, K=3, D=6)
    opt = Optimizers(model, [], "adam", 0.05, 0.0)
    ours = WeightAverage(model, DECAY, [], opt.parts)
    theirs = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(DECAY))
    rng = np.random.default_rng(3)
    for _ in range(8):
        train_step(model, opt, [], objective_for("batch", None), *bags(rng, items=M), 0.2, 1)
        ours.update(model)
        theirs.update_parameters(model)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, msg=k)
