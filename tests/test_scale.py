"""Million-item catalogues: the streaming generator, the catalogue vocabulary, and a 10^6-item smoke run."""

import json
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from macrid.data import lake
from macrid.data.batches import item_counts, load_dataset
from macrid.errors import DataError
from macrid.data.prepare import prepare
from macrid.data.readers import read_items, read_raw
from macrid.data.split import Protocol
from macrid.data.synthetic import SyntheticSpec, chunks, generate, write_shards


def test_generator_plants_categories_bag_sizes_and_power_law():
    spec = SyntheticSpec(n_users=3000, n_items=5000, K=5, seed=2)
    raw = generate(spec)
    df = raw.interactions
    sizes = df.group_by("user_id").len()["len"].to_numpy()
    assert sizes.max() <= spec.max_items and np.median(sizes) >= 20 and sizes.min() >= spec.min_items // 2
    assert df.select(pl.struct("user_id", "item_id").is_unique().all()).item()  # a bag holds an item once
    category = np.array([int(g[0].split("-")[1]) for g in raw.items["genres"].to_list()])
    per_user = (df.with_columns(cat=pl.Series(category[df["item_id"].to_numpy()]))
                .group_by("user_id").agg(pl.col("cat").n_unique())["cat"].to_numpy())
    assert set(np.unique(per_user)) <= {1, 2, 3}  # 2..3 categories (a tiny share may draw one)
    assert (per_user >= 2).mean() > 0.95
    counts = np.sort(np.bincount(df["item_id"].to_numpy(), minlength=spec.n_items))[::-1]
    ranks = np.arange(10, 2000)  # power law: log count falls linearly in log rank (planted exponent 0.8)
    slope = np.polyfit(np.log(ranks + 1), np.log(counts[ranks] + 1), 1)[0]
    assert -1.0 < slope < -0.5, slope


def test_chunks_are_the_same_data_as_one_pass():
    spec = SyntheticSpec(n_users=500, n_items=300, seed=4)
    small = pl.concat([part for _, part in chunks(spec, chunk_users=120)])
    assert small["user_id"].n_unique() == 500 and small["user_id"].max() == 499
    assert small["item_id"].max() < 300


def test_streamed_shards_are_published_whole_and_prepare_with_the_catalogue(tmp_path):
    out = str(tmp_path / "raw")
    manifest = write_shards(SyntheticSpec(n_users=400, n_items=3000, seed=5), out, chunk_users=150, progress=False)
    assert sorted(p.name for p in (tmp_path / "raw" / "interactions").iterdir()) == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert lake.read_json(f"{out}/_manifest.json")["interactions"] == manifest["interactions"]
    raw = read_raw(f"{out}/interactions")
    raw = type(raw)(raw.interactions, read_items(f"{out}/items"), raw.source, raw.format)
    meta = prepare(raw, str(tmp_path / "lake"), "cat", Protocol(heldout=40, vocabulary="catalogue"))
    assert meta["n_items"] == 3000  # every catalogue item, though fewer were ever played
    train = load_dataset(str(tmp_path / "lake"), "cat").train
    trained = np.unique(train.indices)
    assert len(trained) < 3000 and trained.max() < len(trained)  # played items first, cold ones after
    # streamed workers take the sampler's popularity from the items table instead of the bags
    assert np.array_equal(item_counts(str(tmp_path / "lake"), "cat"), train.item_counts(3000))
    with pytest.raises(DataError, match="already exists"):
        write_shards(SyntheticSpec(n_users=10, n_items=10), out, progress=False)


def test_catalogue_vocabulary_needs_an_item_table(tmp_path):
    raw = generate(SyntheticSpec(n_users=300, n_items=100, seed=6))
    raw = type(raw)(raw.interactions, None, raw.source, raw.format)
    with pytest.raises(DataError, match="--items"):
        prepare(raw, str(tmp_path), "x", Protocol(heldout=20, vocabulary="catalogue"))


def test_item_table_without_item_column_names_the_file(tmp_path):
    pl.DataFrame({"sku": [1, 2]}).write_parquet(tmp_path / "items.parquet")
    with pytest.raises(DataError, match=r"items\.parquet: missing column 'item_id'"):
        read_items(tmp_path / "items.parquet")


SMOKE = r"""
import json, resource, sys, time
from macrid.config import load_config
from macrid.data.prepare import prepare
from macrid.data.split import Protocol
from macrid.data.synthetic import SyntheticSpec, generate
from macrid.training.train import run_in_process

lake = sys.argv[1]
meta = prepare(generate(SyntheticSpec(n_users=3000, n_items=1_000_000, seed=3)), lake, "m1e6",
               Protocol(heldout=300, vocabulary="catalogue"))
cfg = load_config(None, [f"data.lake={lake!r}", "data.dataset='m1e6'", "run.name='smoke'", "model.K=5",
                         "model.D=16", "optim.negatives=2000", "optim.proposal_alpha=0.75", "optim.epochs=1",
                         "optim.batch_size=500", "run.eval_users=200", "run.progress=false"])
m = run_in_process(cfg)
print(json.dumps({"n_items": meta["n_items"], "steps": m["history"][-1]["step"], "val": m["val"],
                  "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}))
"""


@pytest.mark.slow
def test_million_item_smoke_run_within_memory(tmp_path):
    """10^6 items: prepare, sampled-softmax steps on row-sparse tables, chunked evaluation of sampled users.

    Dense handling of the same run would allocate B x M scores (2 GB per 500 users) and dense
    gradients and moments; the bound below leaves room for the model's own tables only.
    """
    out = subprocess.run([sys.executable, "-c", SMOKE, str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["n_items"] == 1_000_000
    assert r["steps"] == 5  # ceil(2,400 training users / 500)
    assert r["val"]["sampled_from"] == 300 and 150 <= r["val"]["users"] <= 200
    assert 0.0 <= r["val"]["ndcg@100"][0] <= 1.0
    assert r["peak_gb"] < 3.0, r["peak_gb"]
