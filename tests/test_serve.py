"""The live steering service: jobs/serve.py on a local Ray Serve, over real HTTP, and its page in headless chromium.

Answers are checked against the scores restated here from the model's tables (Eq. 6 for c_i, A_ui of the
decoder, the mode for an item's concept), the traversal against jobs/explain.py's, and bad input against the
service staying up."""

import json
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl
import pytest
import torch

from macrid.config import load_config
from macrid.data.prepare import prepare
from macrid.data.readers import read_raw
from macrid.data.split import Protocol
from macrid.training.checkpoint import load_model
from macrid.training.train import run_in_process

from conftest import ROOT, free_port, real_data, system_binary

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A 2-epoch ml-100k run (K = 4, D = 16) served by `python jobs/serve.py` on a local Ray of its own."""
    lake = str(tmp_path_factory.mktemp("serve-lake"))
    prepare(read_raw(real_data("ml-100k")), lake, "ml-100k", Protocol())
    run_in_process(load_config(None, [f"data.lake={lake!r}", "data.dataset='ml-100k'", "run.name='live'", "model.K=4",
                                      "model.D=16", "optim.epochs=2", "run.progress=false", "run.threads=1"]))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp_path_factory.mktemp("serve-log") / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "serve.py"), "--lake", lake, "--run", "live",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=2)
            break
        except OSError:
            time.sleep(1)
    assert proc.poll() is None, open(log.name).read()[-3000:]
    yield {"url": url, "lake": lake, "proc": proc, "log": log.name}
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def call(url, path, body=None, raw=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def restated(lake, item_ids, weights=None, top_n=10):
    """The top-N for a session of items, from the model's tables with the formulas written out here."""
    model, _ = load_model(f"{lake}/runs/live")
    vocab = pl.read_parquet(f"{lake}/runs/live/vocabulary.parquet").sort("item_idx")
    index = {str(i): n for n, i in enumerate(vocab["item_id"].to_list())}
    own = np.array(sorted(index[i] for i in item_ids))
    with torch.no_grad():
        mu = model.represent(torch.as_tensor(own), torch.tensor([0, len(own)]))[0].numpy()  # (K, D) Eq. 7
    h, m, tau = model.h.detach().numpy(), model.m.detach().numpy(), model.tau
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    logits = unit(h) @ unit(m).T / tau  # (M, K)
    c = np.exp(logits - logits.max(1, keepdims=True))
    c /= c.sum(1, keepdims=True)  # Eq. 6
    concept = c.argmax(1)  # the mode
    score = np.log((c * np.exp(unit(h) @ unit(mu).T / tau)).sum(1))  # log A_ui
    w = np.ones(model.K) if weights is None else np.array([weights.get(k, 1.0) for k in range(model.K)])
    with np.errstate(divide="ignore"):
        score = score + np.log(w[concept])
    score[own] = -np.inf
    top = [i for i in np.argsort(-score, kind="stable")[:top_n] if np.isfinite(score[i])]
    ids = vocab["item_id"].cast(pl.String).to_list()
    return [(ids[i], float(score[i]), int(concept[i])) for i in top], c, concept, ids


def test_a_session_is_folded_in_and_ranked_as_the_decoder_scores_it(served):
    session = ["50", "172", "181", "1"]
    status, answer = call(served["url"], "/recommend", {"items": session, "top_n": 15})
    assert status == 200, answer
    expected, c, _, _ = restated(served["lake"], session, top_n=15)
    assert [(i["item"], i["concept"]) for i in answer["items"]] == [(i, k) for i, _, k in expected]
    assert [i["score"] for i in answer["items"]] == pytest.approx([s for _, s, _ in expected], abs=1e-4)
    assert sorted(e["item"] for e in answer["excluded"]) == sorted(session) and answer["excluded_count"] == 4
    own = [int(i) for i in session]  # ml-100k's item IDs are 1..1682, in vocabulary order of first appearance:
    vocab = pl.read_parquet(f"{served['lake']}/runs/live/vocabulary.parquet")  # map them, do not assume
    idx = vocab.filter(pl.col("item_id").is_in(own))["item_idx"].to_numpy()
    share = c[idx].sum(0) / c[idx].sum()
    assert answer["shares"] == pytest.approx(share.tolist(), abs=1e-5)
    assert answer["model"]["run"] == "live" and answer["model"]["epoch"] >= 1
    assert all(i["title"] for i in answer["items"])


def test_a_short_bounded_load_from_eight_clients_is_answered_without_error(served):
    """200 steered sessions from 8 concurrent clients (the figures live in benchmarks/serve.md): every one is a 200
    whose list is top_n long and leaves out the session's own items and the concept weighted 0."""
    vocab = pl.read_parquet(f"{served['lake']}/runs/live/vocabulary.parquet")["item_id"].cast(pl.String).to_list()
    rng = np.random.default_rng(0)
    bodies = []
    for n in range(200):
        session = [vocab[i] for i in rng.choice(len(vocab), 20, replace=False)]
        bodies.append({"items": session, "top_n": 100, "weights": {str(n % 4): 0.0, str((n + 1) % 4): 2.0}})
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: call(served["url"], "/recommend", b), bodies))
    assert [status for status, _ in answers] == [200] * len(bodies)
    for body, (_, answer) in zip(bodies, answers):
        items = [i["item"] for i in answer["items"]]
        assert len(items) == 100 and not set(items) & set(body["items"])
        assert all(i["concept"] != int(next(iter(body["weights"]))) for i in answer["items"])
    assert call(served["url"], "/healthz")[0] == 200


def test_a_concept_at_weight_zero_leaves_no_item_of_it_and_two_doubles_its_score(served):
    session = ["50", "172", "181", "1"]
    _, plain = call(served["url"], "/recommend", {"items": session, "top_n": 20})
    k = plain["items"][0]["concept"]
    status, steered = call(served["url"], "/recommend", {"items": session, "top_n": 20, "weights": {str(k): 0.0}})
    assert status == 200 and steered["items"] and all(i["concept"] != k for i in steered["items"])
    expected, _, _, _ = restated(served["lake"], session, {k: 0.0}, top_n=20)
    assert [i["item"] for i in steered["items"]] == [i for i, _, _ in expected]
    _, doubled = call(served["url"], "/recommend", {"items": session, "top_n": 20, "weights": {str(k): 2.0}})
    before = {i["item"]: i["score"] for i in plain["items"]}
    for item in doubled["items"]:
        if item["item"] in before and item["concept"] == k:
            assert item["score"] == pytest.approx(before[item["item"]] + math.log(2), abs=1e-4)


def test_a_user_of_the_dataset_is_answered_without_their_own_items(served):
    lake = served["lake"]
    from macrid.data.batches import snapshot_uri

    snap = snapshot_uri(lake, "ml-100k")
    users = pl.read_parquet(f"{snap}/users/")
    row = users.filter(pl.col("user_id") == 1).row(0, named=True)
    split = pl.read_parquet(f"{snap}/{row['split']}/").filter(pl.col("user_idx") == row["user_idx"])
    items = split["items"][0] if row["split"] == "train" else split["foldin"][0].extend(split["heldout"][0])
    vocab = pl.read_parquet(f"{lake}/runs/live/vocabulary.parquet").sort("item_idx")
    own_ids = sorted(str(vocab["item_id"][int(i)]) for i in items.to_list())
    status, answer = call(served["url"], "/recommend", {"user": "1", "top_n": 30})
    assert status == 200, answer
    assert answer["excluded_count"] == len(own_ids)
    assert not {i["item"] for i in answer["items"]} & set(own_ids)
    expected, _, _, _ = restated(lake, own_ids, top_n=30)
    assert [i["item"] for i in answer["items"]] == [i for i, _, _ in expected]


def test_the_traversal_is_explain_s_and_concepts_count_every_item(served):
    url, lake = served["url"], served["lake"]
    status, walked = call(url, "/traverse?dim=3&item=50&steps=6")
    assert status == 200, walked
    cli = subprocess.run([sys.executable, str(ROOT / "jobs" / "explain.py"), "--lake", lake, "--run", "live", "--json",
                          "traverse", "--item", "50", "--dim", "3", "--steps", "6"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    assert [s["item"] for s in walked["steps"]] == [s["item"] for s in json.loads(cli.stdout)["steps"]]
    status, concepts = call(url, "/concepts")
    assert status == 200
    _, c, concept, ids = restated(lake, ["50"])
    assert [e["size"] for e in concepts["concepts"]] == np.bincount(concept, minlength=c.shape[1]).tolist()
    index = {i: n for n, i in enumerate(ids)}
    for e in concepts["concepts"]:
        probs = [c[index[t["item"]], e["concept"]] for t in e["typical"]]
        assert all(t["concept"] == e["concept"] for t in e["typical"]) and probs == sorted(probs, reverse=True)
        members = c[concept == e["concept"], e["concept"]]
        assert probs[0] == pytest.approx(members.max(), abs=1e-5)  # the most typical item is the most certain one
    # the majority genre, restated from the dataset's items table
    from macrid.data.batches import snapshot_uri

    items = pl.read_parquet(f"{snapshot_uri(lake, 'ml-100k')}/items/").sort("item_idx")
    e = concepts["concepts"][0]
    genres = items.filter(pl.Series(concept == 0))["genres"].explode().value_counts(sort=True)
    assert e["genre"] == genres[0, 0]


@pytest.mark.parametrize("body,status,words", [
    ({"user": "no-such-user"}, 404, ["unknown user", "no-such-user"]),
    ({"items": ["50", "999999"]}, 404, ["999999"]),
    ({"items": ["50"], "weights": {"9": 0}}, 400, ["concept 9", "K = 4"]),
    ({"items": ["50"], "edits": {"1": {"40": 0.3}}}, 400, ["dimension 40", "D = 16"]),
    ({"items": ["50"], "weights": {"1": -1}}, 400, ["outside"]),
    ({"items": ["50"], "top_n": -3}, 400, ["top_n", "at least 1"]),
    ({"items": ["50"], "top_n": "ten"}, 400, ["top_n"]),
    ({"user": "1", "items": ["50"]}, 400, ["exactly one"]),
    ({"items": []}, 400, ["non-empty"]),
    ({"items": ["50"], "shell": "rm -rf /"}, 400, ["unknown field", "shell"]),
    ([1, 2], 400, ["JSON object"]),
    (b'{"items": ["50"], "weights": {"1": NaN}}', 400, ["NaN"]),
    (b'{"items": ["50"], "weights": {"1": Infinity}}', 400, ["Infinity"]),
    (b'{"items": ["50"', 400, ["not valid JSON"]),
    (b"\xff\xfe not utf-8", 400, ["not valid JSON"]),
    (b'{"items": ["' + b"1" * 70_000 + b'"]}', 413, ["over 65536 bytes"]),
])
def test_bad_input_gets_a_4xx_that_names_it_and_the_service_stays_up(served, body, status, words):
    raw = body if isinstance(body, bytes) else None
    got, answer = call(served["url"], "/recommend", None if raw else body, raw=raw)
    assert got == status and set(answer) == {"error"}, answer
    for w in words:
        assert w in answer["error"], (w, answer)
    assert call(served["url"], "/healthz")[0] == 200


def test_a_huge_top_n_is_capped_and_a_bad_traversal_is_named(served):
    status, answer = call(served["url"], "/recommend", {"items": ["50"], "top_n": 10**9})
    assert status == 200 and len(answer["items"]) == 100
    assert call(served["url"], "/traverse?dim=99&item=50") == (400, {"error": "dim: dimension 99 is out of range "
                                                                               "(D = 16: 0..15)"})
    status, answer = call(served["url"], "/traverse?dim=1&item=nope")
    assert status == 404 and "nope" in answer["error"]


def test_metrics_count_requests_by_endpoint_and_name_the_model(served):
    def count(text, endpoint, status):
        key = f'macrid_serve_requests_total{{endpoint="{endpoint}",status="{status}"}}'
        return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(key)), 0.0)

    def metrics():
        return urllib.request.urlopen(served["url"] + "/metrics", timeout=30).read().decode()

    before = metrics()
    for _ in range(3):
        call(served["url"], "/recommend", {"items": ["50"]})
    call(served["url"], "/recommend", {"items": ["nope"]})
    after = metrics()
    assert count(after, "/recommend", "200") - count(before, "/recommend", "200") == 3
    assert count(after, "/recommend", "404") - count(before, "/recommend", "404") == 1
    assert 'macrid_serve_model_epoch{run="live"}' in after and "macrid_serve_latency_seconds_bucket" in after


def test_an_unreachable_lake_leaves_the_loaded_model_answering(served):
    lake = served["lake"]
    moved = lake + "-away"
    os.rename(lake, moved)
    try:
        health = call(served["url"], "/healthz")[1]
        assert health["model"] == "loaded" and health["lake"].startswith("unreachable")
        status, answer = call(served["url"], "/recommend", {"items": ["50", "172"]})
        assert status == 200 and len(answer["items"]) == 10
        status, answer = call(served["url"], "/recommend", {"user": "1"})
        assert status in (404, 503) and "error" in answer
    finally:
        os.rename(moved, lake)
    assert call(served["url"], "/healthz")[1]["lake"] == "reachable"


def test_the_page_steers_the_list_in_headless_chromium(served):
    """A person's path: pick user 1, see 20 items; pull the first item's concept to 0 and the list redraws
    without that concept; walk a dimension from a clicked item. Everything the page loads is the service's."""
    from playwright.sync_api import sync_playwright

    chromium = system_binary("chromium", "chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        errors, foreign = [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: None if r.url.startswith(served["url"]) else foreign.append(r.url))
        page.goto(served["url"] + "/")
        page.wait_for_selector("#sliders input[type=range]")
        assert page.locator("#sliders input[type=range]").count() == 4
        assert "run live, epoch" in page.inner_text("#model")
        page.fill("#user", "1")
        page.click("#load")
        page.wait_for_selector("#list li")
        assert page.locator("#list li").count() == 20
        k = page.get_attribute("#list li >> nth=0", "data-concept")
        seq = page.get_attribute("#list", "data-seq")
        t0 = time.perf_counter()
        page.locator(f"#sliders input[data-concept='{k}']").fill("0")
        page.wait_for_function(f"document.getElementById('list').dataset.seq !== '{seq}'")
        seconds = time.perf_counter() - t0
        shown = [page.get_attribute(f"#list li >> nth={i}", "data-concept") for i in range(page.locator("#list li").count())]
        assert shown and k not in shown
        print(f"[serve] slider to list redrawn in {seconds * 1000:.0f} ms (headless chromium, this machine)")
        page.click("#clear")
        page.click("#typical .chip >> nth=0")
        page.wait_for_function("document.querySelectorAll('#list li').length > 0")
        page.fill("#walk-j", "3")
        page.click("#walk-go")
        page.wait_for_selector("#walk .step, #walk .step-none")
        assert errors == [] and foreign == []
        browser.close()


def test_the_serve_config_for_a_cluster_is_valid_and_names_this_deployment():
    """infra/serve/macrid-serve.yaml, as `serve deploy` reads it: Ray's own schema, an import path that builds
    the application, and deployment settings addressed to the deployment the application has (a mismatch fails
    the deploy on the cluster, not here, unless checked)."""
    import importlib

    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "infra" / "serve" / "macrid-serve.yaml").read_text()))
    app = config.applications[0]
    module, _, name = app.import_path.partition(":")
    builder = getattr(importlib.import_module(module), name)
    application = builder(app.args)
    deployment = application._bound_deployment
    assert [d.name for d in app.deployments] == [deployment.name] == ["macrid-steering"]
    assert app.deployments[0].autoscaling_config["max_replicas"] > app.deployments[0].autoscaling_config["min_replicas"]
    assert config.http_options.port == 8000 and app.route_prefix == "/"


def test_a_model_alias_serves_the_run_it_points_to_and_a_bad_one_is_refused_before_ray(served, tmp_path):
    """--model NAME loads what the alias points to (jobs/promote.py's pointer); an unknown alias or run is exit 2
    with its name, before Ray or Serve start."""
    from macrid.output.steering import load
    from macrid.training.registry import point

    point(served["lake"], "prod", "live", {"reason": "test"})
    assert load(served["lake"], None, "prod").info.run == "live"
    for flag, value in (("--model", "no-such-alias"), ("--run", "no-such-run")):
        done = subprocess.run([sys.executable, str(ROOT / "jobs" / "serve.py"), "--lake", served["lake"], flag, value,
                               "--port", str(free_port())], capture_output=True, text=True, timeout=120, cwd=ROOT,
                              env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
        assert done.returncode == 2 and value in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert "Started a local Ray" not in done.stderr + done.stdout
