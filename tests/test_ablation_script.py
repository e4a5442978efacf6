"""scripts/ablate_mnist.py: every variant is a valid config, and the tables it writes show
exactly the measured JSON figures (the README block is replaced, nothing else)."""

import importlib.util
import json
from pathlib import Path

import pytest

from lipmargin.config import load_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def ablate():
    spec = importlib.util.spec_from_file_location("ablate", REPO / "scripts" / "ablate_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ablation_variants_parse(ablate) -> None:
    assert {"paper", "base", "c4f3"} <= set(ablate.VARIANTS)
    assert set(ablate.README_ROWS) <= set(ablate.VARIANTS)
    for key, (_, cfg_path, overrides) in ablate.VARIANTS.items():
        cfg = load_config(REPO / cfg_path, overrides)
        assert cfg.method == "lmt", key


def _fake_result(key: str, clean: float, c158: float) -> dict:
    acc = {"0.5": 0.9, "1.0": 0.8, "1.58": c158, "2.0": 0.3}
    return {
        "key": key,
        "description": f"variant {key}",
        "config": "configs/x.toml",
        "overrides": ["c=3.0"],
        "command": "lipmargin train --config configs/x.toml --set 'c=3.0'",
        "epochs": 7,
        "train_seconds_logged": 600.0,
        "median_epoch_seconds": 80.0,
        "final_train_accuracy": 0.95,
        "certification": {"clean_accuracy": clean, "certified_accuracy": acc, "median_radius": 1.5},
        "audit": {"n": 100, "n_certified": 61, "broken": []},
    }


def test_tables_show_the_measured_numbers(ablate, tmp_path, monkeypatch) -> None:
    out = tmp_path / "docs" / "results" / "ablation"
    out.mkdir(parents=True)
    (out / "base.json").write_text(json.dumps(_fake_result("base", 0.9627, 0.5589)))
    (out / "c4f3.json").write_text(json.dumps(_fake_result("c4f3", 0.9712, 0.6301)))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\noutro\n")
    monkeypatch.setattr(ablate, "ROOT", tmp_path)
    monkeypatch.setattr(ablate, "OUT", out)

    table = ablate.write_table()
    assert (tmp_path / "docs" / "ABLATION.md").read_text() == table
    base_row = next(ln for ln in table.splitlines() if ln.startswith("| variant base"))
    assert (
        "| 96.27 | 90.00 | 80.00 | 55.89 | 30.00 | 1.500 | 95.00 | 10 | 0 / 61 (first 100) |"
        in (base_row)
    )
    assert "variant paper" not in table  # only measured variants appear

    ablate.write_readme_table()
    text = readme.read_text()
    assert text.startswith("intro\n<!-- results:start -->") and text.endswith("outro\n")
    assert "old" not in text
    assert "97.12" in text and "63.01" in text and "62.8" in text  # ours and GloRo's
