"""Issue 8 ablation: what each change beyond the paper's recipe buys on MNIST at radius 1.58.

Every variant is a committed config plus ``--set``-style overrides, changed one thing at a time
from the base recipe (``configs/mnist_lmt_maxmin.toml``: Wong-Kolter net, MaxMin, c = 2, 45
epochs, lr x0.1 after epochs 30 and 40). Each variant is trained (or resumed) into
``runs/ablation/<key>``, certified on the full MNIST test set with the guaranteed bound, optionally
audited, and written to ``docs/results/ablation/<key>.json``; ``docs/ABLATION.md`` is rebuilt from
all JSON files present, so the table only ever shows measured runs.

Usage:
    python scripts/ablate_mnist.py --data-dir data --only relu c1      # train + certify those
    python scripts/ablate_mnist.py --data-dir data --audit-n 1000 --only c4f3   # + lipmargin audit
    python scripts/ablate_mnist.py --table-only                        # rebuild the table

Run one variant per core with OMP_NUM_THREADS=1 (small nets are slower with two threads here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from lipmargin.certify import batches, evaluate
from lipmargin.config import load_config
from lipmargin.data import load_dataset
from lipmargin.runs import has_checkpoint, load_run, read_log
from lipmargin.runtime import steady_allocator
from lipmargin.train import train

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "results" / "ablation"
EPS = [0.5, 1.0, 1.58, 2.0]
BASE = "configs/mnist_lmt_maxmin.toml"
C4F3 = "configs/mnist_lmt_c4f3_maxmin.toml"

# key: (description, config, overrides). Order is the table's order.
VARIANTS: dict[str, tuple[str, str, list[str]]] = {
    "paper": ("paper recipe: ReLU, c = 1, 20 epochs, constant lr", "configs/mnist_lmt.toml", []),
    "base": ("base: Wong-Kolter, MaxMin, c = 2, 45 ep, lr steps 30/40", BASE, []),
    "relu": ("base with ReLU instead of MaxMin", BASE, ['model_kwargs={"activation": "relu"}']),
    "c1": ("base with c = 1", BASE, ["c=1.0"]),
    "c3": ("base with c = 3", BASE, ["c=3.0"]),
    "global": ("base with the global (Prop. 1) LMT form", BASE, ['lmt_form="global"']),
    "const-lr": ("base with a constant learning rate", BASE, ["lr_milestones=[]"]),
    "warmup": (
        "base with c warmed up from 0 over 10 epochs",
        BASE,
        ["c0=0.0", "c_warmup_epochs=10"],
    ),
    "90ep": (
        "base trained twice as long (90 ep, lr steps 60/80)",
        BASE,
        ["epochs=90", "lr_milestones=[60, 80]"],
    ),
    "lr1e-4": ("base with Adam lr 1e-4 (the 4C3F rows' rate)", BASE, ["lr=1e-4"]),
    "ps10": ("base with 10 power-iteration steps per update", BASE, ["power_steps=10"]),
    "pe4": (
        "base with the power iteration every 4th step (power_every = 4, issue 16)",
        BASE,
        ["power_every=4"],
    ),
    "be4": (
        "base with the lazy bound every 4th step (bound_every = 4, its gradient x4, issue 16)",
        BASE,
        ["bound_every=4", 'lazy_gradient="scaled"'],
    ),
    "base-seed1": (
        "base with seed 1 instead of 0 (the run-to-run spread of the comparisons, issue 16)",
        BASE,
        ["seed=1"],
    ),
    "be4-held": (
        "base with the lazy bound every 4th step, a held first-order model between "
        "(bound_every = 4, lazy_gradient = held, issue 16)",
        BASE,
        ["bound_every=4", 'lazy_gradient="held"'],
    ),
    "be4-ps4-held": (
        "base with the lazy bound every 4th step, 4 power-iteration steps per computed bound "
        "(as many per training step as the base), a held first-order model between (issue 16)",
        BASE,
        ["bound_every=4", "power_steps=4", 'lazy_gradient="held"'],
    ),
    "be8-ps8-held": (
        "base with the lazy bound every 8th step, 8 power-iteration steps per computed bound "
        "(as many per training step as the base), a held first-order model between (issue 16)",
        BASE,
        ["bound_every=8", "power_steps=8", 'lazy_gradient="held"'],
    ),
    "be4-ps10-lanczos": (
        "base with the lazy bound every 4th step (gradient x4) and 10 products per computed "
        "bound moved by Lanczos (issue 16)",
        BASE,
        [
            "bound_every=4",
            "power_steps=10",
            'lazy_gradient="scaled"',
            'power_method="lanczos"',
        ],
    ),
    "be8-ps8": (
        "base with the lazy bound every 8th step and 8 power-iteration steps per computed bound "
        "(lazy_gradient = scaled, issue 16)",
        BASE,
        ["bound_every=8", "power_steps=8", 'lazy_gradient="scaled"'],
    ),
    "be16-ps16-lanczos": (
        "base with the lazy bound every 16th step and 16 products per computed bound moved by "
        "Lanczos (one per training step, as the base, issue 16)",
        BASE,
        [
            "bound_every=16",
            "power_steps=16",
            'lazy_gradient="scaled"',
            'power_method="lanczos"',
        ],
    ),
    "be8-ps8-held-lanczos": (
        "base with the lazy bound every 8th step (a held first-order model between) and 8 "
        "products per computed bound moved by Lanczos (issue 16)",
        BASE,
        [
            "bound_every=8",
            "power_steps=8",
            'lazy_gradient="held"',
            'power_method="lanczos"',
        ],
    ),
    "be8-held": (
        "base with the lazy bound every 8th step, a held first-order model between "
        "(bound_every = 8, lazy_gradient = held, issue 16)",
        BASE,
        ["bound_every=8", 'lazy_gradient="held"'],
    ),
    "be4-ps10": (
        "base with bound_every = 4 and 10 power-iteration steps per computed bound (issue 16)",
        BASE,
        ["bound_every=4", "power_steps=10", 'lazy_gradient="scaled"'],
    ),
    "be8-ps20": (
        "base with bound_every = 8 and 20 power-iteration steps per computed bound (issue 16)",
        BASE,
        ["bound_every=8", "power_steps=20", 'lazy_gradient="scaled"'],
    ),
    "c4f3-ps1": (
        "4C3F, MaxMin, c = 2, lr 1e-4, 1 power step per update (paper Alg. 1), "
        "stopped after 14 of 45 epochs",
        C4F3,
        ["power_steps=1", "epochs=45", "lr_milestones=[32, 40]"],
    ),
    "c4f3-14ep": (
        "4C3F, MaxMin, c = 2, lr 1e-4, 10 power steps per update: checkpoint after 14 epochs",
        C4F3,
        [],
    ),
    "c4f3": (
        "4C3F, MaxMin, c = 2, lr 1e-4, 10 power steps per update, 40 ep, steps 28/36",
        C4F3,
        [],
    ),
    "c4f3-be4": (
        "c4f3 with the lazy bound every 4th step (bound_every = 4, its gradient x4, issue 16)",
        C4F3,
        ["bound_every=4", 'lazy_gradient="scaled"'],
    ),
    "c4f3-be4-held": (
        "c4f3 with the lazy bound every 4th step, a held first-order model between "
        "(bound_every = 4, lazy_gradient = held, issue 16)",
        C4F3,
        ["bound_every=4", 'lazy_gradient="held"'],
    ),
    "c4f3-best-be4": (
        "c4f3 with Adam lr 3e-4, ema_decay = 0.999 and bound_every = 4 (the shipped recipe "
        "with the lazy bound instead of power_every = 2, issue 16)",
        C4F3,
        ["lr=3e-4", "ema_decay=0.999", "bound_every=4", 'lazy_gradient="scaled"'],
    ),
    "c4f3-be4-held-lanczos": (
        "c4f3-be4-held with the vectors moved by Lanczos (power_method = lanczos: the top Ritz "
        "vector of the 9 products' Krylov space, issue 16)",
        C4F3,
        ["bound_every=4", 'lazy_gradient="held"', 'power_method="lanczos"'],
    ),
    "c4f3-be6-held-lanczos": (
        "c4f3-be4-held-lanczos with the bound walked every 6th step (bound_every = 6, issue 16)",
        C4F3,
        ["bound_every=6", 'lazy_gradient="held"', 'power_method="lanczos"'],
    ),
    "c4f3-be8-held-lanczos": (
        "c4f3-be4-held-lanczos with the bound walked every 8th step (bound_every = 8, issue 16)",
        C4F3,
        ["bound_every=8", 'lazy_gradient="held"', 'power_method="lanczos"'],
    ),
    "c4f3-best-be4-held-lanczos": (
        "c4f3 with Adam lr 3e-4, ema_decay = 0.999, bound_every = 4 with a held first-order "
        "model between and Lanczos (the shipped recipe with the lazy bound, issue 16)",
        C4F3,
        [
            "lr=3e-4",
            "ema_decay=0.999",
            "bound_every=4",
            'lazy_gradient="held"',
            'power_method="lanczos"',
        ],
    ),
    "c4f3-best-be4-held": (
        "c4f3 with Adam lr 3e-4, ema_decay = 0.999 and bound_every = 4 with a held first-order "
        "model between (the shipped recipe with the lazy bound, issue 16)",
        C4F3,
        ["lr=3e-4", "ema_decay=0.999", "bound_every=4", 'lazy_gradient="held"'],
    ),
    # issue 15 (session 4): one change at a time from the c4f3 row
    "c4f3-lr3e-4": (
        "c4f3 with Adam lr 3e-4 and the power iteration every 2nd step (power_every = 2)",
        C4F3,
        ["lr=3e-4", "power_every=2"],
    ),
    "c4f3-gloro": (
        "c4f3 with the GloRo loss (eps warmed up from 0 over 10 epochs) and power_every = 2, "
        "stopped after 12 of 40 epochs",
        C4F3,
        ['loss="gloro"', "c0=0.0", "c_warmup_epochs=10", "power_every=2"],
    ),
    "c4f3-lr3e-4-ema": (
        "c4f3 with Adam lr 3e-4, power_every = 2 and ema_decay = 0.999 (the two best changes)",
        C4F3,
        ["lr=3e-4", "power_every=2", "ema_decay=0.999"],
    ),
    "c4f3-ema": (
        "c4f3 with an exponential moving average of the weights (ema_decay = 0.999)",
        C4F3,
        ["ema_decay=0.999"],
    ),
}


def run_variant(key: str, data_dir: str | None, audit_n: int, x, y, train_it: bool) -> dict:
    desc, cfg_path, overrides = VARIANTS[key]
    cfg = load_config(ROOT / cfg_path, overrides + [f'name="ablation-{key}"'])
    run_dir = ROOT / "runs" / "ablation" / key
    if train_it:
        train(cfg, run_dir, resume=has_checkpoint(run_dir), data_dir=data_dir, progress=False)
    log = read_log(run_dir)
    model, bound, _, _, meta = load_run(run_dir)
    t0 = time.perf_counter()
    rep = evaluate(model, bound, batches(x, y, 1000), EPS)
    result = {
        "key": key,
        "description": desc,
        "config": cfg_path,
        "overrides": overrides,
        "command": f"lipmargin train --config {cfg_path}"
        + "".join(f" --set '{o}'" for o in overrides),
        "epochs": meta["epoch"],
        "train_seconds_logged": sum(r["seconds"] for r in log),
        "median_epoch_seconds": statistics.median(r["seconds"] for r in log),
        "final_train_accuracy": log[-1]["train_accuracy"],
        "certify_seconds": time.perf_counter() - t0,
        "certification": rep.to_dict(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    }
    OUT.mkdir(parents=True, exist_ok=True)
    audit_json = OUT / f"{key}_audit.json"
    if audit_n:  # exactly the command a user runs; exit status 1 means a broken certificate
        cmd = ["lipmargin", "audit", str(run_dir), "--n", str(audit_n), "--json", str(audit_json)]
        subprocess.run(cmd + (["--data-dir", data_dir] if data_dir else []), check=False)
    if audit_json.exists():
        result["audit"] = json.loads(audit_json.read_text())
    (OUT / f"{key}.json").write_text(json.dumps(result, indent=2))
    return result


def _rows(out: Path | None = None) -> dict[str, dict]:
    """The measured variants: ``<key>.json`` (certification) files in ``out`` (default OUT)."""
    out = OUT if out is None else out
    if not out.exists():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json") if "_" not in p.stem}


def _audit_cell(r: dict) -> str:
    a = r.get("audit")
    return f"{len(a['broken'])} / {a['n_certified']} (first {a['n']})" if a else "not run"


def variant_rows(rows: dict[str, dict], keys, minutes: str) -> list[str]:
    """One table line per measured variant, in the order of ``keys`` (shared with
    scripts/losses_mnist.py): description, epochs, clean, certified at EPS, median radius,
    final train accuracy, train minutes (format ``minutes``), audit."""
    lines = []
    for key in keys:
        if key not in rows:
            continue
        r = rows[key]
        c = r["certification"]
        lines.append(
            f"| {r['description']} | {r['epochs']} | {100 * c['clean_accuracy']:.2f} | "
            + _cert_cells(c)
            + f" | {c['median_radius']:.3f} | {100 * r['final_train_accuracy']:.2f} | "
            f"{r['train_seconds_logged'] / 60:{minutes}} | {_audit_cell(r)} |"
        )
    return lines


def _cert_cells(c: dict) -> str:
    ca = c["certified_accuracy"]
    return " | ".join(f"{100 * ca[str(float(e))]:.2f}" for e in EPS)


def write_table() -> str:
    rows = _rows()
    lines = [
        "# Issue 8 ablation: MNIST, certified accuracy at L2 radius 1.58",
        "",
        "Produced by `python scripts/ablate_mnist.py --data-dir data` (one variant per core, "
        "OMP_NUM_THREADS=1, on a 2-core x86_64 CPU). Full MNIST test set (10,000 points), "
        "guaranteed bound (`LipschitzBound.certified()`, Prop. 2 pairwise radii). Each row "
        "changes one thing from the base row unless it says otherwise. Train time is the sum "
        "of the logged epoch times (two runs shared the machine, one core each).",
        "",
        "| variant | epochs | clean | cert. 0.5 | cert. 1.0 | cert. 1.58 | cert. 2.0 "
        "| median radius | final train acc. | train time (min) | audit: broken / certified |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += variant_rows(rows, VARIANTS, minutes=".0f")
    lines += ["", "Commands (then `lipmargin certify runs/ablation/<key> --data-dir data`):", ""]
    for key in VARIANTS:
        if key in rows:
            lines.append(f"- `{key}`: `{rows[key]['command']} --out runs/ablation/{key}`")
    lines.append("")
    text = "\n".join(lines)
    path = ROOT / "docs" / "ABLATION.md"
    old = path.read_text() if path.exists() else ""
    if "<!-- losses:start -->" in old:  # keep issue 15's section (scripts/losses_mnist.py)
        text += "\n" + old[old.index("<!-- losses:start -->") :]
    path.write_text(text)
    return text


# Published MNIST figures at L2 radius 1.58 (sources in ../shared/reference/lmt-paper-notes.md).
LITERATURE = [
    ("LMT paper (Tsuzuku et al., NeurIPS 2018), Wong-Kolter net, c = 1", "", "", "~1.02"),
    ("LMT re-run in BCP (Lee et al., NeurIPS 2020)", "86.48", "40.55", ""),
    ("GloRo (Leino et al., ICML 2021), 4C3F, MinMax", "", "62.8", ""),
]
README_ROWS = [
    "paper",
    "base",
    "be8-ps8-held-lanczos",
    "c4f3",
    "c4f3-be4-held",
    "c4f3-be4-held-lanczos",
    "c4f3-be6-held-lanczos",
    "c4f3-be8-held-lanczos",
    "c4f3-lr3e-4",
    "c4f3-lr3e-4-ema",
    "c4f3-best-be4-held-lanczos",
]


def write_readme_table() -> None:
    """Replace the README block between the results markers with the measured rows."""
    rows = _rows()
    lines = [
        "<!-- results:start -->",
        "| model | config | clean | cert. 0.5 | cert. 1.0 | cert. 1.58 | cert. 2.0 | median radius "
        "| training (min) | audit: broken / certified |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, clean, c158, median in LITERATURE:
        lines.append(f"| {label} | published | {clean} | | | {c158} | | {median} | | |")
    for key in README_ROWS:
        if key not in rows:
            continue
        r = rows[key]
        c = r["certification"]
        lines.append(
            f"| lipmargin: {r['description']} | `{r['config']}`"
            + "".join(f" `{o}`" for o in r["overrides"])
            + f" | {100 * c['clean_accuracy']:.2f} | "
            + _cert_cells(c)
            + f" | {c['median_radius']:.3f} | {r['train_seconds_logged'] / 60:.0f} "
            f"| {_audit_cell(r)} |"
        )
    lines.append("<!-- results:end -->")
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index("<!-- results:start -->"), text.index("<!-- results:end -->")
    readme.write_text(text[:start] + "\n".join(lines) + text[end + len("<!-- results:end -->") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--only", nargs="*", default=None, choices=list(VARIANTS))
    ap.add_argument("--audit-n", type=int, default=0)
    ap.add_argument("--skip-train", action="store_true", help="certify existing runs only")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    steady_allocator()  # lipmargin.runtime: training steps ~20% faster on glibc
    if not args.table_only:
        x, y = load_dataset("mnist", "test", args.data_dir)
        for key in args.only or list(VARIANTS):
            r = run_variant(key, args.data_dir, args.audit_n, x, y, not args.skip_train)
            c = r["certification"]
            print(key, c["clean_accuracy"], c["certified_accuracy"], c["median_radius"], flush=True)
    print(write_table())
    write_readme_table()


if __name__ == "__main__":
    main()
