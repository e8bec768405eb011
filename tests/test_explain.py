"""jobs/explain.py on a real run of ml-100k: traversal and steering with titles, and its bad input."""

import importlib.util
import json

import pytest

from macrid.config import load_config
from macrid.data.prepare import prepare
from macrid.data.readers import read_raw
from macrid.data.split import Protocol
from macrid.training.train import run_in_process

from conftest import ROOT, real_data


@pytest.fixture(scope="module")
def run_lake(tmp_path_factory):
    lake = str(tmp_path_factory.mktemp("lake"))
    prepare(read_raw(real_data("ml-100k")), lake, "ml-100k", Protocol())
    run_in_process(load_config(None, [f"data.lake={lake!r}", "data.dataset='ml-100k'", "run.name='r'", "model.K=4",
                                      "model.D=16", "optim.epochs=3", "run.progress=false"]))
    return lake


def explain(capsys, *argv):
    spec = importlib.util.spec_from_file_location("explain_job", ROOT / "jobs" / "explain.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    code = job.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_traversal_from_an_item_lists_titles_rising_in_the_dimension(run_lake, capsys):
    code, out, _ = explain(capsys, "--lake", run_lake, "--run", "r", "--json", "traverse", "--item", "50",
                           "--dim", "3", "--steps", "5")
    assert code == 0
    t = json.loads(out)
    assert "Star Wars" in t["from"] and len(t["steps"]) == 5
    values = [s["value"] for s in t["steps"]]
    assert values == sorted(values) and all("[" in s["item"] for s in t["steps"])
    code, text, _ = explain(capsys, "--lake", run_lake, "--run", "r", "traverse", "--user", "1", "--component", "2",
                            "--dim", "0", "--steps", "4")
    assert code == 0 and text.startswith("from component 2 of user 1")


def test_steering_a_concept_away_removes_it_from_the_list(run_lake, capsys):
    code, out, _ = explain(capsys, "--lake", run_lake, "--run", "r", "--json", "steer", "--user", "1",
                           "--weight", "0=0", "--weight", "1=0", "--top-n", "10")
    assert code == 0
    s = json.loads(out)
    assert len(s["before"]) == len(s["after"]) == 10
    assert all(x["concept"] not in (0, 1) for x in s["after"])
    # and what stays keeps its order: the unsteered list without concepts 0 and 1, then items further down
    kept = [x["item"] for x in s["before"] if x["concept"] not in (0, 1)]
    assert [x["item"] for x in s["after"]][:len(kept)] == kept


@pytest.mark.parametrize("argv,words", [
    (["traverse", "--item", "99999", "--dim", "0"], ["99999", "vocabulary"]),
    (["steer", "--user", "123456"], ["123456", "not in dataset"]),
    (["traverse", "--item", "50", "--dim", "16"], ["--dim 16", "D = 16"]),
    (["steer", "--user", "1", "--set", "9:0=1"], ["component 9", "K = 4"]),
    (["traverse", "--item", "1.5", "--dim", "0"], ["'1.5'", "not an item ID", "Int64"]),
    (["traverse", "--item", "abc", "--dim", "0"], ["'abc'", "not an item ID"]),
])
def test_bad_input_is_named(run_lake, capsys, argv, words):
    code, _, err = explain(capsys, "--lake", run_lake, "--run", "r", *argv)
    assert code == 2
    for w in words:
        assert w in err, err


def test_a_run_without_a_checkpoint_is_named(run_lake, capsys):
    code, _, err = explain(capsys, "--lake", run_lake, "--run", "nope", "traverse", "--item", "50", "--dim", "0")
    assert code == 2 and "nope" in err and "model.pt" in err


def test_an_export_that_does_not_exist_and_a_report_from_an_export_are_named(run_lake, capsys):
    code, _, err = explain(capsys, "--lake", run_lake, "--export", "nightly", "steer", "--user", "1")
    assert code == 2 and "nightly" in err and "jobs/export.py" in err
    code, _, err = explain(capsys, "--lake", run_lake, "--export", "nightly", "report")
    assert code == 2 and "report needs --run" in err


def test_the_report_renders_in_headless_chromium_with_its_sections_and_images(run_lake, capsys, tmp_path):
    import base64
    import re
    import subprocess

    import matplotlib.image

    from conftest import system_binary

    chromium = system_binary("chromium", "chromium")
    code, out, err = explain(capsys, "--lake", run_lake, "--run", "r", "report")
    assert code == 0, err
    page = out.strip()
    text = open(page).read()
    for section in ("metrics", "concepts", "alignment", "map", "micro", "traversals", "curve"):
        assert f"<section id='{section}'>" in text
    images = re.findall(r"src='data:image/png;base64,([^']+)'", text)
    assert len(images) == 3  # the item map, the correlation figure and the learning curve, embedded
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Star Wars" in text or "concept 0" in text
    # the figure's independence is the one evaluation recorded for the test users (all 93 of ml-100k's)
    recorded = json.load(open(f"{run_lake}/runs/r/metrics.json"))["test"]["independence"]
    assert re.search(r"components: <b>([0-9.]+)</b>", text).group(1) == f"{recorded:.3f}"
    shot = tmp_path / "report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2600", f"--screenshot={shot}"]
    subprocess.run([chromium, *flags, f"file://{page}"], capture_output=True, timeout=120)
    pixels = matplotlib.image.imread(shot)  # (H, W, 3 or 4) floats
    assert pixels.shape[:2] == (2600, 1200)
    # the page painted: dark text and coloured figures on white, not a blank or error page
    assert (pixels[..., :3].mean(axis=2) < 0.5).mean() > 0.005
    dom = subprocess.run([chromium, *flags[:-2], "--dump-dom", f"file://{page}"], capture_output=True, text=True,
                         timeout=120).stdout
    assert "Genre alignment" in dom and "Learning curve" in dom and dom.count("<img") == 3
