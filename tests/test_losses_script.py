"""scripts/losses_mnist.py (issue 15): every variant is a valid config, the train command it
records parses back to the same config, and its ABLATION.md section shows exactly the measured
JSON figures, replaced in place and kept when scripts/ablate_mnist.py rewrites its own table."""

import importlib.util
import json
import shlex
from pathlib import Path

import pytest

from lipmargin.config import load_config

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def losses():
    return _load("losses_mnist")


def test_variants_parse_and_commands_round_trip(losses) -> None:
    assert "lmt-ps10-25ep" in losses.VARIANTS
    seen = set()
    for key, (_, cfg_path, overrides) in losses.VARIANTS.items():
        cfg = load_config(REPO / cfg_path, overrides)
        assert cfg.method == "lmt" and cfg.power_steps == 10, key
        seen.add(cfg.loss)
        argv = shlex.split(shlex.join(losses.train_command(key)))
        assert argv[:4] == ["lipmargin", "train", "--config", cfg_path]
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        again = load_config(REPO / cfg_path, sets)
        assert (
            again.to_dict()
            == load_config(REPO / cfg_path, [*overrides, f'name="losses-{key}"']).to_dict()
        )
        assert argv[-2:] == ["--out", f"runs/losses/{key}"]
    assert seen == {"lmt", "gloro", "emma", "cll"}


def _fake(key: str, c158: float) -> dict:
    return {
        "key": key,
        "description": f"variant {key}",
        "command": f"lipmargin train --config x.toml --out runs/losses/{key}",
        "epochs": 25,
        "train_seconds_logged": 300.0,
        "final_train_accuracy": 0.96,
        "certification": {
            "clean_accuracy": 0.9611,
            "certified_accuracy": {"0.5": 0.9, "1.0": 0.8, "1.58": c158, "2.0": 0.3},
            "median_radius": 1.7,
        },
        "audit": {"n": 1000, "n_certified": 950, "broken": []},
    }


def test_section_shows_measured_rows_and_survives_ablation_table(losses, tmp_path, monkeypatch):
    out = tmp_path / "docs" / "results" / "losses"
    out.mkdir(parents=True)
    (out / "gloro-158.json").write_text(json.dumps(_fake("gloro-158", 0.6123)))
    (out / "gloro-158_audit.json").write_text("{}")  # auxiliary files are not rows
    monkeypatch.setattr(losses, "ROOT", tmp_path)
    monkeypatch.setattr(losses, "OUT", out)
    doc = tmp_path / "docs" / "ABLATION.md"
    doc.write_text("# Issue 8 table\n")
    losses.write_section()
    text = doc.read_text()
    assert text.startswith("# Issue 8 table\n") and text.count(losses.START) == 1
    row = next(ln for ln in text.splitlines() if ln.startswith("| variant gloro-158"))
    assert (
        "| 96.11 | 90.00 | 80.00 | 61.23 | 30.00 | 1.700 | 96.00 | 5.0 | 0 / 950 (first 1000) |"
        in row
    )
    assert "lmt-ps10-25ep" not in text  # only measured rows
    # a second run replaces the block in place
    (out / "gloro-158.json").write_text(json.dumps(_fake("gloro-158", 0.6222)))
    losses.write_section()
    text = doc.read_text()
    assert text.count(losses.START) == 1 and "62.22" in text and "61.23" not in text
    # scripts/ablate_mnist.py rewrites its table and keeps this section
    ablate = _load("ablate_mnist")
    monkeypatch.setattr(ablate, "ROOT", tmp_path)
    monkeypatch.setattr(ablate, "OUT", tmp_path / "none")
    ablate.write_table()
    text = doc.read_text()
    assert text.startswith("# Issue 8 ablation") and "62.22" in text
