"""`jobs/train.py --print-config`: the resolved config, every key explained, readable back by --config."""

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

from macrid.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]


def print_config(*args: str) -> str:
    done = subprocess.run([sys.executable, "jobs/train.py", *args, "--print-config"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_print_config_writes_every_key_with_a_comment_and_reads_back(tmp_path):
    lake = tmp_path / "lake"
    out = print_config("--config", "configs/ml-1m.toml", "--set", "model.K=3", "--lake", str(lake))
    printed = tomllib.loads(out)
    shipped = tomllib.loads((ROOT / "configs" / "ml-1m.toml").read_text())
    assert printed["model"]["K"] == 3  # the override wins
    assert printed["optim"]["lr"] == shipped["optim"]["lr"]  # the file's values
    assert printed["data"]["lake"] == str(lake)
    for section in dataclasses.fields(Config):  # every key of every section is written out
        assert set(printed[section.name]) == {f.name for f in dataclasses.fields(section.default_factory)}
    # every key line has its explanation on the line above
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            assert lines[i - 1].startswith("# "), f"{line!r} has no comment above it"
    assert lines[lines.index("threads = 0") - 1].startswith("# torch intra-op threads per worker")
    # --config takes the file back as it is
    (tmp_path / "printed.toml").write_text(out)
    assert load_config(tmp_path / "printed.toml") == load_config(
        ROOT / "configs" / "ml-1m.toml", ["model.K=3", f"data.lake={str(lake)!r}"])
    assert not lake.exists()  # nothing was trained or generated
