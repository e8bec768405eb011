"""Concept recovery: on planted data the learned concept of each item should match its planted category."""

import numpy as np
import polars as pl
import pytest
import torch

from macrid.data.batches import snapshot_uri
from macrid.config import load_config
from macrid.training.metrics import nmi
from macrid.data.prepare import prepare
from macrid.data.split import Protocol
from macrid.data.synthetic import SyntheticSpec, generate
from macrid.training.train import load_model, run_in_process

# The target is NMI >= 0.8; it is NOT met. Measured with exactly this setup: 0.572 with full
# softmax, 0.415 with sampled softmax (S = 200 = 10% of M, batch candidates); other settings tried
# reached 0.18-0.78 (benchmarks/scale.md). The bound asserts recovery far above chance (~0.002 for
# 2,000 items in 5 groups) without claiming the target.
MIN_NMI = 0.3


@pytest.fixture(scope="module")
def planted_lake(tmp_path_factory):
    lake = str(tmp_path_factory.mktemp("planted"))
    prepare(generate(SyntheticSpec(n_users=6000, n_items=2000, K=5, seed=7)), lake, "p", Protocol(heldout=500))
    return lake


@pytest.mark.slow
@pytest.mark.parametrize("softmax", ["full", "sampled"])
def test_learned_concepts_recover_planted_categories(planted_lake, softmax):
    extra = ["optim.negatives=200", "optim.proposal_alpha=0.75"] if softmax == "sampled" else []
    run_in_process(load_config(None, [f"data.lake={planted_lake!r}", "data.dataset='p'", f"run.name={softmax!r}", "model.K=5",
                           "model.D=8", "optim.epochs=40", "optim.lr=1e-2", "run.progress=false", *extra]))
    model, _ = load_model(f"{planted_lake}/runs/{softmax}")
    items = pl.read_parquet(f"{snapshot_uri(planted_lake, 'p')}/items/part-0.parquet")
    planted = np.array([genres[0] for genres in items["genres"].to_list()])
    with torch.no_grad():
        learned = model.concepts().argmax(1).numpy()
    score = nmi(planted, learned)
    print(f"concept NMI ({softmax} softmax): {score:.3f}")
    assert score >= MIN_NMI, score
