"""jobs/explain.py on a real run of ml-100k: traversal and steering with titles, and its bad input."""

import importlib.util
import json

import pytest

from macrid.config import load_config
from macrid.prepare import prepare
from macrid.readers import read_raw
from macrid.split import Protocol
from macrid.train import run_in_process

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


@pytest.mark.parametrize("argv,words", [
    (["traverse", "--item", "99999", "--dim", "0"], ["99999", "vocabulary"]),
    (["steer", "--user", "123456"], ["123456", "not in dataset"]),
    (["traverse", "--item", "50", "--dim", "16"], ["--dim 16", "D = 16"]),
    (["steer", "--user", "1", "--set", "9:0=1"], ["component 9", "K = 4"]),
])
def test_bad_input_is_named(run_lake, capsys, argv, words):
    code, _, err = explain(capsys, "--lake", run_lake, "--run", "r", *argv)
    assert code == 2
    for w in words:
        assert w in err, err


def test_a_run_without_a_checkpoint_is_named(run_lake, capsys):
    code, _, err = explain(capsys, "--lake", run_lake, "--run", "nope", "traverse", "--item", "50", "--dim", "0")
    assert code == 2 and "nope" in err and "model.pt" in err
