"""Sweeps: the search-space file, the best-config file, and a small real sweep on ml-100k."""

import importlib.util

import pytest

from macrid.config import Config, load_config, to_toml
from macrid.errors import ConfigError
from macrid.search_space import apply, load_space

from conftest import ROOT

pytestmark = pytest.mark.timeout(600)


def test_shipped_search_spaces_load_against_their_models():
    for model in ("macridvae", "multvae", "multdae"):
        space = load_space(ROOT / "configs" / "search" / f"{model}.toml", load_config(None, [f"model.name={model!r}"]))
        assert "optim.lr" in space
    assert "model.tau" not in load_space(ROOT / "configs" / "search" / "macridvae.toml", Config())  # fixed at 0.1


@pytest.mark.parametrize("text,words", [
    ("[model]\nKK = {choice = [1, 2]}\n", ["model.KK", "not a config key"]),
    ("[modle]\nK = {choice = [1, 2]}\n", ["[modle]", "not a config section"]),
    ("[optim]\nlr = {normal = [0, 1]}\n", ["optim.lr", "one distribution"]),
    ("[optim]\nlr = {loguniform = [0.0, 1e-3]}\n", ["optim.lr", "low > 0"]),
    ("[optim]\nlr = {uniform = [1e-2, 1e-3]}\n", ["optim.lr", "low < high"]),
])
def test_a_bad_search_space_is_refused_naming_the_key(tmp_path, text, words):
    path = tmp_path / "space.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_space(path, Config())
    for w in words:
        assert w in str(e.value)


def test_the_best_config_file_reads_back_as_the_same_config(tmp_path):
    cfg = load_config(ROOT / "configs" / "ml-1m.toml", ["optim.anneal='authors'", "run.name='x \"quoted\"'"])
    (tmp_path / "best.toml").write_text(to_toml(cfg, "a header\nsecond line"))
    assert load_config(tmp_path / "best.toml") == cfg


def test_searching_a_baselines_d_keeps_its_hidden_width_equal():
    cfg = apply(load_config(None, ["model.name='multvae'"]), {"model.D": 200})
    assert (cfg.model.D, cfg.model.hidden) == (200, 200)
    assert apply(Config(), {"model.D": 50}).model.hidden == Config().model.hidden  # MacridVAE: no hidden


def test_a_small_sweep_writes_a_best_config_that_trains(ml100k_lake, ray_cluster, tmp_path):
    spec = importlib.util.spec_from_file_location("tune_job", ROOT / "jobs" / "tune.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    space = tmp_path / "space.toml"
    space.write_text("[optim]\nlr = {loguniform = [1e-3, 1e-2]}\nanneal = {choice = [\"linear\", \"authors\"]}\n")
    overrides = [f"data.lake={ml100k_lake!r}", "data.dataset='ml-100k'", "model.K=3", "model.D=16",
                 "optim.epochs=2"]
    assert job.main(["--config", str(ROOT / "configs" / "ml-100k.toml"), "--space", str(space), "--samples", "2",
                     "--grace-epochs", "1", "--name", "smoke", *sum([["--set", o] for o in overrides], [])]) == 0
    best = f"{ml100k_lake}/runs/smoke/best.toml"
    cfg = load_config(best, ["run.name='from-best'", "run.progress=false"])
    assert cfg.model.K == 3 and cfg.optim.epochs == 2 and cfg.optim.anneal in ("linear", "authors")
    from macrid.train import run_in_process

    assert run_in_process(cfg)["epochs_run"] == 2
