"""Sweeps: the search-space file, the best-config file, and a small real sweep on ml-100k."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

from macrid.config import Config, load_config, to_toml
from macrid.errors import ConfigError
from macrid.training.search_space import apply, load_space
from macrid.training.sweep import local_trial_cpus

from conftest import ROOT

pytestmark = pytest.mark.timeout(600)


def test_shipped_search_spaces_load_against_their_models():
    for model in ("macridvae", "multvae", "multdae"):
        space = load_space(ROOT / "configs" / "search" / f"{model}.toml", load_config(None, [f"model.name={model!r}"]))
        assert "optim.lr" in space
    assert "model.tau" not in load_space(ROOT / "configs" / "search" / "macridvae.toml", Config())  # fixed at 0.1


@pytest.mark.parametrize("name", ["ml-1m-local", "ml-1m-second", "gowalla"])
def test_the_dataset_search_spaces_load_against_their_configs(name):
    """The spaces quality.md's sweeps ran: each key still exists in the config the file's header names."""
    config = "gowalla" if name == "gowalla" else "ml-1m"
    space = load_space(ROOT / "configs" / "search" / f"{name}.toml", load_config(ROOT / "configs" / f"{config}.toml", []))
    assert "optim.beta" in space and "model.tau" not in space


@pytest.mark.parametrize("text,words", [
    ("[model]\nKK = {choice = [1, 2]}\n", ["model.KK", "not a config key"]),
    ("[modle]\nK = {choice = [1, 2]}\n", ["[modle]", "not a config section"]),
    ("[optim]\nlr = {normal = [0, 1]}\n", ["optim.lr", "one distribution"]),
    ("[optim]\nlr = {loguniform = [0.0, 1e-3]}\n", ["optim.lr", "low > 0"]),
    ("[optim]\nlr = {uniform = [1e-2, 1e-3]}\n", ["optim.lr", "low < high"]),
    ('[model]\nK = {choice = ["seven"]}\n', ["model.K", "'seven' is not valid", "should be int"]),
    ("[optim]\nema = {uniform = [0.5, 2.0]}\n", ["optim.ema", "2.0 is not valid", "out of range"]),
    ("[model]\nK = {uniform = [2, 9]}\n", ["model.K", "integer key", "choice"]),
    ("[model]\nname = {choice = [\"macridvae\", \"vae\"]}\n", ["model.name", "'vae' is not valid"]),
])
def test_a_bad_search_space_is_refused_naming_the_key(tmp_path, text, words):
    path = tmp_path / "space.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_space(path, Config())
    for w in words:
        assert w in str(e.value)


def test_the_best_config_file_reads_back_as_the_same_config(tmp_path):
    cfg = load_config(ROOT / "configs" / "ml-1m.toml", ["optim.anneal='authors'", "data.lake='x \"quoted\" \\\\ path'"])
    (tmp_path / "best.toml").write_text(to_toml(cfg, "a header\nsecond line"))
    assert load_config(tmp_path / "best.toml") == cfg


def test_searching_a_baselines_d_keeps_its_hidden_width_equal():
    cfg = apply(load_config(None, ["model.name='multvae'"]), {"model.D": 200})
    assert (cfg.model.D, cfg.model.hidden) == (200, 200)
    assert apply(Config(), {"model.D": 50}).model.hidden == Config().model.hidden  # MacridVAE: no hidden


def tune_job():
    spec = importlib.util.spec_from_file_location("tune_job", ROOT / "jobs" / "tune.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


# small single-worker Ray Train trials reading the lake in memory; the sweep sizes their CPUs on a local Ray
TRIAL = ["model.K=3", "model.D=16", "optim.epochs=2", "run.num_workers=1", "run.data='memory'", "run.threads=1"]


def sets(*overrides):
    return sum([["--set", o] for o in overrides], [])


@pytest.fixture
def ray_started_by_the_job(s3_endpoint):
    """No Ray running: jobs/tune.py starts its own local Ray (with the dashboard, whose State API Ray Train's
    placement-group cleaner asks), as on a laptop; shut down afterwards."""
    import ray

    assert not ray.is_initialized()
    yield
    ray.shutdown()


def test_local_trials_share_the_machine():
    """Hand-computed: CPUs per worker = ((node - concurrent * 0.01 for the trial actors) / concurrent
    - 1 Ray Data CPU when streaming) / workers."""
    assert local_trial_cpus(2, 2, 1, streams=False) == pytest.approx(0.99)
    assert local_trial_cpus(2, 1, 1, streams=False) == pytest.approx(1.99)
    assert local_trial_cpus(16, 4, 2, streams=True) == pytest.approx(1.495)
    with pytest.raises(ConfigError, match="2 concurrent trials.*--concurrent.*run.data='memory'"):
        local_trial_cpus(2, 2, 1, streams=True)  # 0.99 - 1 leaves nothing for the worker
    with pytest.raises(ConfigError, match="16 concurrent trials"):
        local_trial_cpus(2, 16, 1, streams=False)


def test_a_sweep_of_ray_train_trials_writes_a_best_config_that_trains(ml100k_lake, ray_started_by_the_job, tmp_path):
    """Every trial warm-starts from the same parent (a finished in-process run), as a nightly sweep does."""
    from macrid.training.launch import prepare_config
    from macrid.training.train import run_in_process

    run_in_process(prepare_config(load_config(ROOT / "configs" / "ml-100k.toml", [
        f"data.lake={ml100k_lake!r}", "data.dataset='ml-100k'", "run.name='sweep-parent'", "run.progress=false",
        *TRIAL])))
    space = tmp_path / "space.toml"
    space.write_text("[optim]\nlr = {loguniform = [1e-3, 1e-2]}\nanneal = {choice = [\"linear\", \"authors\"]}\n"
                     "[model]\nsigma0 = {loguniform = [0.05, 0.5]}\n")
    assert tune_job().main(["--config", str(ROOT / "configs" / "ml-100k.toml"), "--space", str(space), "--samples", "2",
                            "--concurrent", "2", "--grace-epochs", "1", "--name", "smoke", "--lake", ml100k_lake,
                            "--warm-start", "sweep-parent", *sets("data.dataset='ml-100k'", *TRIAL)]) == 0
    root = f"{ml100k_lake}/runs/smoke"
    trials = pl.read_parquet(f"{root}/trials.parquet")
    assert trials.height == 2 and {"optim.lr", "optim.anneal", "model.sigma0", "best_val_ndcg"} <= set(trials.columns)
    # every trial was a Ray Train run of its own, with Ray Train's checkpoints in its run folder
    runs = [p for p in os.listdir(f"{ml100k_lake}/runs") if p.startswith("smoke-")]
    assert len(runs) == 2
    assert all(os.path.exists(f"{ml100k_lake}/runs/{r}/checkpoint_manager_snapshot.json") for r in runs)
    assert {json.load(open(f"{ml100k_lake}/runs/{r}/run.json"))["parent"]["run"] for r in runs} == {"sweep-parent"}
    finished = [r for r in runs if os.path.exists(f"{ml100k_lake}/runs/{r}/metrics.json")]
    assert len(finished) == (trials["epoch"] == 2).sum() >= 1  # trials ASHA did not stop finished their run
    # two trials at once fit the local machine: their workers and trial actors (0.01 CPU each) within its CPUs
    import ray

    node_cpus = ray.cluster_resources()["CPU"]
    for r in finished:
        run = json.load(open(f"{ml100k_lake}/runs/{r}/metrics.json"))["config"]["run"]
        assert 2 * (run["cpus_per_worker"] + 0.01) <= node_cpus + 1e-9 and run["cpus_per_worker"] >= 0.9 * node_cpus / 2
    assert os.path.getsize(f"{root}/sweep.png") > 10_000
    cfg = load_config(f"{root}/best.toml", ["run.name='from-best'", "run.progress=false", "optim.epochs=1"])
    assert cfg.run.cpus_per_worker == 0  # the trials' share of this machine is not written into the best config
    assert cfg.model.K == 3 and cfg.optim.anneal in ("linear", "authors")
    header = re.search(r"NDCG@100 ([0-9.]+)", open(f"{root}/best.toml").readline()).group(1)
    assert trials["best_val_ndcg"].max() == pytest.approx(float(header), abs=1e-4)
    from macrid.training.train import run_in_process

    assert run_in_process(cfg)["epochs_run"] == 1


def test_an_interrupted_sweep_on_s3_resumes_without_rerunning_finished_trials(s3_sweep_lake, tmp_path):
    """The driver is killed once a trial has finished; --resume runs the rest, and not that trial again."""
    import boto3

    space = tmp_path / "space.toml"
    space.write_text("[optim]\nlr = {loguniform = [1e-3, 1e-2]}\n")
    args = [sys.executable, str(ROOT / "jobs" / "tune.py"), "--config", str(ROOT / "configs" / "ml-100k.toml"),
            "--space", str(space), "--samples", "2", "--concurrent", "1", "--grace-epochs", "2", "--name", "cut",
            "--lake", s3_sweep_lake, *sets("data.dataset='syn'", *TRIAL)]
    s3 = boto3.client("s3")

    def keys(prefix):
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket="lake", Prefix=prefix)
        return {o["Key"]: o["LastModified"] for page in pages for o in page.get("Contents", [])}

    def finished_trials():
        states = [k for k in keys("sweep/runs/cut/ray/") if k.rsplit("/", 1)[-1].startswith("experiment_state")]
        text = "".join(s3.get_object(Bucket="lake", Key=k)["Body"].read().decode() for k in states)
        return text.count("TERMINATED")

    driver = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=dict(os.environ, TUNE_GLOBAL_CHECKPOINT_S="1"))
    deadline = time.time() + 400
    while finished_trials() < 1 and time.time() < deadline and driver.poll() is None:
        time.sleep(1)
    assert finished_trials() >= 1, "no trial finished in time"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    first = {k: v for k, v in keys("sweep/runs/cut-").items() if k.endswith("/metrics.json")}
    assert len(first) == 1
    done = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    after = {k: v for k, v in keys("sweep/runs/cut-").items() if k.endswith("/metrics.json")}
    assert len(after) == 2
    for key, stamp in first.items():  # the finished trial's run was not trained or finished again
        assert after[key] == stamp
    table = pl.read_parquet(boto3.client("s3").get_object(Bucket="lake", Key="sweep/runs/cut/trials.parquet")["Body"])
    assert table.height == 2
    assert "best.toml" in " ".join(keys("sweep/runs/cut/"))
    # every file Tune keeps at the top of its experiment folder is one signed envelope, written by the driver
    listed = keys("sweep/runs/cut/ray/")
    state = [k for k in listed if k.count("/") == 4 and not k.endswith("/")]
    assert {"tuner.pkl"} <= {k.rsplit("/", 1)[1] for k in state}
    assert [k for k in state if not s3.get_object(Bucket="lake", Key=k)["Body"].read().startswith(b"MACRID-SIGNED-1 ")] == []
    # the state the resumed driver wrote resumes again: a second --resume finds every trial done and trains nothing
    again = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {k: v for k, v in keys("sweep/runs/cut-").items() if k.endswith("/metrics.json")} == after
    _tampered_state_is_refused(s3, args, tmp_path)


class _Payload:
    """Unpickled, writes a file: what an attacker with write access to the bucket would plant."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('ran')",)


def _tampered_state_is_refused(s3, args, tmp_path):
    """A planted tuner.pkl or experiment state, unsigned or under another file's signature, stops --resume before
    anything runs."""
    import pickle

    planted = tmp_path / "payload-ran"
    prefix = "sweep/runs/cut/ray/"
    state = next(o["Key"] for o in s3.list_objects_v2(Bucket="lake", Prefix=prefix)["Contents"]
                 if o["Key"].rsplit("/", 1)[1].startswith("experiment_state") and o["Key"].endswith(".json"))
    original = {k: s3.get_object(Bucket="lake", Key=k)["Body"].read() for k in (prefix + "tuner.pkl", state)}
    header, _, _ = original[prefix + "tuner.pkl"].partition(b"\n")
    evil_state = json.dumps({"trial_data": [[json.dumps({"_type": "CLOUDPICKLE_FALLBACK", "value": pickle.dumps(
        _Payload(planted)).hex()}), "{}"]], "runner_data": {}}).encode()
    for key, body, words in ((prefix + "tuner.pkl", pickle.dumps(_Payload(planted)), "carries no signature"),
                             (state, evil_state, "carries no signature"),
                             # a genuine header over other bytes
                             (prefix + "tuner.pkl", header + b"\n" + pickle.dumps(_Payload(planted)),
                              "does not match its content")):
        s3.put_object(Bucket="lake", Key=key, Body=body)
        out = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, RAY_ADDRESS=""))
        assert out.returncode == 2, out.stderr[-2000:]
        assert "refusing to resume" in out.stderr and words in out.stderr and "MACRID_STATE_KEY" in out.stderr
        assert "Traceback" not in out.stderr and not planted.exists()
        for k, v in original.items():
            s3.put_object(Bucket="lake", Key=k, Body=v)


@pytest.fixture(scope="module")
def ray_with_state_api(s3_endpoint):
    """A 2-CPU Ray with the dashboard that the sweep's driver joins (Ray Train's placement-group cleaner asks
    its State API whether a trial's controller is gone); joined, the sweep sizes trials as on a cluster."""
    import ray

    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", object_store_memory=200 * 1024**2,
             configure_logging=False)
    # the drivers (subprocesses) join it by address, as `ray job submit` points a job at its cluster
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield
    os.environ.pop("RAY_ADDRESS", None)
    ray.shutdown()


@pytest.fixture(scope="module")
def s3_sweep_lake(ray_with_state_api, s3_endpoint):
    from macrid.data.prepare import prepare
    from macrid.data.split import Protocol
    from macrid.data.synthetic import SyntheticSpec, generate

    lake = "s3://lake/sweep"
    prepare(generate(SyntheticSpec(n_users=400, n_items=150, K=3, seed=2)), lake, "syn", Protocol())
    return lake
