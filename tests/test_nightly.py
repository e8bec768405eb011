"""The nightly loop (issue 29): warm start across vocabularies, the promotion gate and its alias, the nightly job.

Everything runs on a planted lake whose catalogue changes every day (macrid/data/daily.py): day 2 retires some
of day 1's items, brings new ones, and numbers the vocabulary differently. Expectations are written out here
independently of the code: the carried rows by item ID, the new rows by a dense co-occurrence matrix, item
counts by set arithmetic on IDs, the gate's scores against the run's own evaluation.
"""

import importlib.util
import json

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from conftest import ROOT
from macrid.config import load_config
from macrid.data import lake as lakeio
from macrid.data.daily import DailySpec, day_uri, write_days
from macrid.data.layout import load_meta, snapshot_uri
from macrid.data.prepare import prepare
from macrid.data.raw_input import Source
from macrid.data.readers import read_items
from macrid.data.split import Protocol
from macrid.model.vae import build_model
from macrid.training import registry
from macrid.training.launch import prepare_config
from macrid.training.run_folder import pin_run
from macrid.training.train import run_in_process
from macrid.training.warm_start import INITIAL_FILE, prepare_warm_start

pytestmark = pytest.mark.timeout(600)
SPEC = DailySpec(days=2, n_users=2000, n_items=400, K=4, mean_items=25.0, new_items=0.1, retire=0.05, window=1, seed=3)


def job(name):
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cfg_for(lake, dataset, run, *extra):
    return load_config(None, [f"data.lake={lake!r}", f"data.dataset={dataset!r}", f"run.name={run!r}", "model.K=4",
                              "model.D=24", "model.item_bias=true", "optim.ema=0.9", "optim.batch_size=200",
                              "run.progress=false", *extra])


def prepare_day(lake, raw, day, name="shop"):
    folder = day_uri(raw, day)
    prepare([Source(lakeio.join(folder, "interactions"))], lake, name, Protocol(), overwrite=True,
            items=read_items(lakeio.join(folder, "items")))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Day 1 prepared and a parent trained on it; day 2 prepared as the dataset's next version."""
    root = tmp_path_factory.mktemp("nightly")
    lake, raw = str(root / "lake"), str(root / "raw")
    write_days(SPEC, raw)
    prepare_day(lake, raw, 1)
    day1 = load_meta(lake, "shop")["version"]
    run_in_process(prepare_config(cfg_for(lake, "shop", "parent", "optim.epochs=15", "optim.lr=3e-3")))
    prepare_day(lake, raw, 2)
    return {"lake": lake, "raw": raw, "day1": day1, "day2": load_meta(lake, "shop")["version"]}


def ids_of(table):
    return [str(v) for v in table.sort_by("item_idx")["item_id"].to_pylist()]


def test_the_planted_days_change_the_catalogue_as_specified(world):
    catalogue = pl.read_parquet(f"{world['raw']}/catalogue.parquet")
    manifest = json.loads(open(f"{world['raw']}/_manifest.json").read())
    for day in (1, 2):
        events = pl.read_parquet(f"{day_uri(world['raw'], day)}/interactions/part-0.parquet")
        today = events.filter(pl.col("day") == day).join(catalogue, on="item_id")
        # no event with an item before it is born or after it is retired; the day's new items are clicked
        assert (today["born"] <= day).all() and (today["retired"] > day).all()
        born_today = catalogue.filter(pl.col("born") == day)["item_id"]
        assert today["item_id"].is_in(born_today.to_list()).sum() > 0
        live_before = catalogue.filter((pl.col("born") < day) & (pl.col("retired") >= day)).height
        assert abs(born_today.len() - SPEC.new_items * live_before) <= 1 + 0.02 * live_before
        assert manifest["days"][day - 1]["new_items"] == born_today.len()
    # users come back: most of day 1's users are active again on day 2
    d1 = set(pl.read_parquet(f"{day_uri(world['raw'], 1)}/interactions/part-0.parquet")["user_id"])
    d2 = set(pl.read_parquet(f"{day_uri(world['raw'], 2)}/interactions/part-0.parquet")
             .filter(pl.col("day") == 2)["user_id"])
    assert len(d1 & d2) > 0.3 * len(d2)


def test_a_warm_start_carries_rows_by_item_id_and_folds_new_items_in(world):
    lake = world["lake"]
    cfg, meta = pin_run(prepare_config(cfg_for(lake, "shop", "child", "optim.epochs=1", "run.warm_start='parent'")),
                        "in-process")
    lineage = prepare_warm_start(cfg, meta)
    child = torch.load(f"{lake}/runs/child/{INITIAL_FILE}", weights_only=True)
    parent = torch.load(f"{lake}/runs/parent/checkpoints/best.pt", weights_only=True)
    old = ids_of(pq.read_table(f"{snapshot_uri(lake, 'shop', world['day1'])}/items"))
    new = ids_of(pq.read_table(f"{snapshot_uri(lake, 'shop', world['day2'])}/items"))
    old_row = {item: i for i, item in enumerate(old)}
    carried = [j for j, item in enumerate(new) if item in old_row]
    added = [j for j, item in enumerate(new) if item not in old_row]
    assert lineage["run"] == "parent" and lineage["vocabulary_fingerprint"] == parent["vocabulary_fingerprint"]
    assert lineage["items"]["carried"] == len(carried) and lineage["items"]["added"] == len(added)
    assert lineage["items"]["dropped"] == len(set(old) - set(new)) > 0  # retired items are gone
    assert added and any(old_row[new[j]] != j for j in carried)  # the new version numbers items differently
    assert json.loads(open(f"{lake}/runs/child/run.json").read())["parent"] == lineage

    src = torch.tensor([old_row[new[j]] for j in carried])
    dst = torch.tensor(carried)
    ema_p, ema_c = parent["extra"]["ema"], child["extra"]["ema"]
    adam_p = {k: parent["optimizer"]["parts"][0]["state"][k] for k in parent["optimizer"]["parts"][0]["state"]}
    adam_c = child["optimizer"]["parts"][0]["state"]
    names = [n for n, _ in build_model(cfg.model, len(new)).named_parameters()]
    for key in ("h", "t", "item_bias"):
        assert torch.equal(child["model"][key][dst], parent["model"][key][src]), key  # bit for bit, by ID
        assert torch.equal(ema_c[f"module.{key}"][dst], ema_p[f"module.{key}"][src]), key
        slot = names.index(key)
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(adam_c[slot][moment][dst], adam_p[slot][moment][src]), (key, moment)
            assert not adam_c[slot][moment][torch.tensor(added)].any(), (key, moment)  # new rows: fresh moments
    # a fine-tune: the child's optimizer runs at optim.lr x run.warm_start_lr_scale (0.25 by default)
    assert {g["lr"] for part in child["optimizer"]["parts"] for g in part["param_groups"]} == {cfg.optim.lr * 0.25}
    for key in ("m", "f_nn.weight", "t_bias"):  # prototypes and the encoder carry over whole
        assert torch.equal(child["model"][key], parent["model"][key])

    # new rows: the co-occurrence-weighted mean of the carried rows (restated with a dense matrix)
    bags = pq.read_table(f"{snapshot_uri(lake, 'shop', world['day2'])}/train")["items"].to_pylist()
    X = np.zeros((len(bags), len(new)))
    for u, bag in enumerate(bags):
        X[u, bag] = 1.0
    is_carried = np.zeros(len(new), dtype=bool)
    is_carried[carried] = True
    co = (X.T @ X)[:, is_carried]  # (M, carried) users holding both
    torch.manual_seed(cfg.run.seed)
    fresh = build_model(cfg.model, len(new)).state_dict()
    folded = 0
    for key in ("h", "t", "item_bias"):
        for table, weights in ((child["model"], child["model"]), (ema_c, None)):
            rows = (table[key] if weights is not None else table[f"module.{key}"]).double().numpy()
            for j in added:
                if co[j].sum() > 0:
                    expected = co[j] @ rows[is_carried] / co[j].sum()
                    np.testing.assert_allclose(rows[j], expected, rtol=1e-5, atol=1e-7)
                    folded += 1
                else:
                    assert np.array_equal(rows[j], fresh[key][j].double().numpy())
    assert folded > 0
    assert lineage["items"]["added_folded_in"] == int((co[added].sum(1) > 0).sum())


def test_the_gate_refuses_a_worse_candidate_and_promotes_an_equal_or_better_one(world):
    lake, promote = world["lake"], job("promote").main
    assert promote(["--lake", lake, "--model", "gate", "--candidate", "parent"]) == 0  # the first promotion
    weak = run_in_process(prepare_config(cfg_for(lake, "shop", "weak", "optim.epochs=1", "optim.lr=1e-6")))
    assert promote(["--lake", lake, "--model", "gate", "--candidate", "weak"]) == 3
    assert registry.current(lake, "gate")["run"] == "parent"
    refused = registry.history(lake, "gate")[-1]
    assert refused["event"] == "refused" and refused["z"] <= -2 and refused["candidate_ndcg"] < refused["current_ndcg"]
    # the gate's score of a run on its own dataset is the run's own validation NDCG@100 (all items known)
    assert refused["candidate_ndcg"] == pytest.approx(weak["val"]["ndcg@100"][0], abs=1e-9)

    assert promote(["--lake", lake, "--model", "gate", "--candidate", "parent"]) == 0  # equal: z = 0
    run_in_process(prepare_config(cfg_for(lake, "shop", "better", "optim.epochs=3", "run.warm_start='parent'")))
    assert promote(["--lake", lake, "--model", "gate", "--candidate", "better"]) == 0
    assert registry.current(lake, "gate")["run"] == "better"
    assert registry.history(lake, "gate")[-1]["difference"] > 0
    assert promote(["--lake", lake, "--model", "gate", "--rollback"]) == 0
    assert registry.current(lake, "gate")["run"] == "parent"
    assert [e["event"] for e in registry.history(lake, "gate")] == ["promoted", "refused", "promoted", "promoted",
                                                                     "rolled_back"]


def delta_versions(lake):
    from deltalake import DeltaTable

    return {t: DeltaTable(f"{lake}/exports/nightly/{t}").version()
            for t in ("user_components", "recommendations", "item_concepts", "prototypes")}


def test_the_nightly_job_stops_on_a_failed_stage_or_a_refusal_and_publishes_new_items(world, tmp_path):
    raw, lake = world["raw"], str(tmp_path / "lake")
    nightly = job("nightly").main

    def night(day, *extra):
        folder = day_uri(raw, day)
        return nightly(["--lake", lake, "--input", f"{folder}/interactions", "--items", f"{folder}/items",
                        "--dataset", "shop", "--model", "prod", "--date", f"2026-12-0{day}", "--in-process",
                        "--local", "--top-n", "20", "--set", "model.K=4", "--set", "model.D=24",
                        "--set", "optim.batch_size=200", "--set", "run.progress=false", *extra])

    assert night(1, "--set", "optim.epochs=12", "--set", "optim.lr=3e-3") == 0  # the first night: from scratch, promoted, exported
    first = registry.current(lake, "prod")["run"]
    before = delta_versions(lake)
    assert night(2, "--set", "optim.lr=-1") == 5  # training fails (a bad learning rate)
    assert night(2, "--from-scratch", "--set", "optim.epochs=1", "--set", "optim.lr=1e-6") == 3  # refused
    assert registry.current(lake, "prod")["run"] == first and delta_versions(lake) == before

    assert night(2, "--set", "optim.epochs=3") == 0  # warm-started from `first`, promoted, exported
    current = registry.current(lake, "prod")["run"]
    record = json.loads(open(f"{lake}/runs/{current}/run.json").read())
    assert record["parent"]["run"] == first
    assert all(v > b for v, b in zip(delta_versions(lake).values(), before.values()))
    catalogue = pl.read_parquet(f"{raw}/catalogue.parquet")
    new_today = set(catalogue.filter(pl.col("born") == 2)["item_id"].cast(pl.String))
    concepts = pl.read_delta(f"{lake}/exports/nightly/item_concepts")
    recs = pl.read_delta(f"{lake}/exports/nightly/recommendations")
    known_today = set(concepts.filter(pl.col("dt") == "2026-12-02")["item_id"].cast(pl.String))
    assert new_today & known_today and not new_today & set(
        concepts.filter(pl.col("dt") == "2026-12-01")["item_id"].cast(pl.String))
    rec_today = recs.filter(pl.col("dt") == "2026-12-02").with_columns(pl.col("item_id").cast(pl.String))
    shown = rec_today.filter(pl.col("item_id").is_in(list(new_today)))
    assert shown.height > 0  # new items reach the recommendations the morning after they arrive
    # ... for users who hold items that co-occur with them in today's training bags
    bags = pl.read_parquet(f"{day_uri(raw, 2)}/interactions/part-0.parquet").with_columns(
        pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String))
    holders = bags.group_by("item_id").agg(pl.col("user_id"))
    by_user = {u: set(items) for u, items in bags.group_by("user_id").agg(pl.col("item_id")).iter_rows()}
    by_item = {i: set(users) for i, users in holders.iter_rows()}
    for user, item in shown.select(pl.col("user_id").cast(pl.String), "item_id").head(50).iter_rows():
        co_items = set().union(*(by_user[u] for u in by_item.get(item, ()))) - {item}
        assert by_user.get(user, set()) & co_items, (user, item)
