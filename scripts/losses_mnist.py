"""Issue 15: the margin losses beside LMT (GloRo, EMMA, CLL) on the Wong-Kolter MaxMin net.

Every variant is a committed config plus ``--set`` overrides. Each is trained (or resumed) into
``runs/losses/<key>`` by exactly the command it records (``lipmargin train ...``), then certified
on the full MNIST test set with ``lipmargin certify --json`` and audited with
``lipmargin audit --n 1000 --json``; the figures go to ``docs/results/losses/<key>.json`` and the
section "Issue 15: losses beside LMT" of ``docs/ABLATION.md`` is rebuilt from all JSON files
present, so the table only ever shows measured runs.

Usage (one variant at a time, one thread):
    OMP_NUM_THREADS=1 python scripts/losses_mnist.py --data-dir data --only gloro-158
    python scripts/losses_mnist.py --table-only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablate_mnist  # noqa: E402  (the result-table helpers, beside this script)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "results" / "losses"
RUNS = ROOT / "runs" / "losses"
EPS = ["0.5", "1.0", "1.58", "2.0"]
WK = "configs/mnist_lmt_maxmin.toml"
SHORT = ["power_steps=10", "epochs=25", "lr_milestones=[17, 22]"]
START, END = "<!-- losses:start -->", "<!-- losses:end -->"

# key: (description, config, overrides). Order is the table's order.
VARIANTS: dict[str, tuple[str, str, list[str]]] = {
    "lmt-ps10-25ep": ("LMT, c = 2 (issue 8's best Wong-Kolter recipe), 25 ep", WK, SHORT),
    "gloro-158": ("GloRo, eps 1.58, 25 ep", WK, [*SHORT, 'loss="gloro"', "c=1.58"]),
    "gloro-20": ("GloRo, eps 2.0, 25 ep", WK, [*SHORT, 'loss="gloro"', "c=2.0"]),
    "gloro-20-warm": (
        "GloRo, eps 0 -> 2.0 over 5 epochs, 25 ep",
        WK,
        [*SHORT, 'loss="gloro"', "c=2.0", "c0=0.0", "c_warmup_epochs=5"],
    ),
    "gloro-20-trades": (
        "GloRo + TRADES lambda 1.5, eps 2.0, 25 ep",
        WK,
        [*SHORT, 'loss="gloro"', "c=2.0", "trades_lambda=1.5"],
    ),
    "gloro-174": ("GloRo, eps 1.74 (1.1 x 1.58), 25 ep", WK, [*SHORT, 'loss="gloro"', "c=1.74"]),
    "emma-20": ("EMMA, eps 2.0, 25 ep", WK, [*SHORT, 'loss="emma"', "c=2.0"]),
    "emma-158": ("EMMA, eps 1.58, 25 ep", WK, [*SHORT, 'loss="emma"', "c=1.58"]),
    "cll-158": (
        "CLL, eps 1.58 (logistic centred at radius 3.16), p 0.3, decay 1e-4, 25 ep",
        WK,
        [*SHORT, 'loss="cll"', "c=1.58"],
    ),
    "cll-079": (
        "CLL, eps 0.79 (logistic centred at radius 1.58), p 0.3, decay 1e-4, 25 ep",
        WK,
        [*SHORT, 'loss="cll"', "c=0.79"],
    ),
    "lmt-full": (
        "LMT, c = 2, full schedule: 45 ep, lr steps 30/40 (issue 8's ps10 row, re-run)",
        WK,
        ["power_steps=10"],
    ),
    "gloro-full": (
        "GloRo, eps 0 -> 2.0 over 5 epochs, full schedule: 45 ep, lr steps 30/40",
        "configs/mnist_wk_gloro.toml",
        [],
    ),
}


# What the measured rows show; written by hand from the JSON files, checked against the table.
NOTES: list[str] = [
    "What the rows show:",
    "",
    "- At equal epochs (25) no loss beats LMT with c = 2 at radius 1.58 (55.89%). The best "
    "GloRo variant, eps warmed up from 0 to 2.0 over 5 epochs, ties it (55.79%, clean 95.81% "
    "vs 96.09%) and certifies more at 2.0 (40.79% vs 37.74%; median radius 1.740 vs 1.719). "
    "GloRo at eps 1.58 keeps the most clean accuracy (96.23%) but certifies 54.95%; eps 1.74 "
    "gives 55.48%, eps 2.0 without warm-up 54.56%, and GloRo's TRADES term (lambda 1.5, eps 2.0) "
    "54.53% with 94.63% clean.",
    "- The eps warm-up matters for GloRo: +1.23 points at 1.58 and +0.65 clean at eps 2.0.",
    "- Full schedule (45 epochs, `configs/mnist_wk_gloro.toml`): GloRo 95.77% clean, 56.63% at "
    "1.58, 41.28% at 2.0, median radius 1.764, against 96.44% / 57.16% / 38.23% / 1.737 for "
    "LMT re-run here with the same schedule (issue 8's run of that LMT recipe, `ps10` in "
    "docs/results/ablation, gave 96.35% / 57.63% / 38.56%: the spread between two runs of one "
    "recipe is about half a point). GloRo gives up about half a point at 1.58 and 0.7 points "
    "of clean accuracy for three points at 2.0: it does not clearly beat LMT on this net, so no "
    "4C3F GloRo run was started.",
    "- EMMA (per-class radius clipped to [0.01 eps, eps]) keeps clean accuracy at eps 1.58 "
    "(96.27%) but certifies less at 1.58 (53.22%) and much less at 2.0 (29.72%); at eps 2.0 it "
    "loses clean accuracy (94.45%) and reaches 53.68%.",
    "- CLL with the authors' CIFAR-10 settings (p 0.3, Lipschitz decay 1e-4 on (max K)^2, bound "
    "held constant in the calibrated term) trains poorly here in 25 epochs: 86.26% clean and "
    "43.15% at 1.58 with eps 1.58 (its logistic is centred at radius 2 eps = 3.16), 93.11% and "
    "48.58% with eps 0.79 (centred at 1.58).",
    "- Every audit (PGD + C&W on the first 1000 test points) found 0 broken certificates.",
]


def train_command(key: str) -> list[str]:
    _, cfg_path, overrides = VARIANTS[key]
    cmd = ["lipmargin", "train", "--config", cfg_path]
    for o in [*overrides, f'name="losses-{key}"']:
        cmd += ["--set", o]
    return cmd + ["--out", f"runs/losses/{key}"]


def _lipmargin() -> list[str]:
    return [sys.executable, "-m", "lipmargin"]


def run_variant(key: str, data_dir: str | None, audit_n: int, train_it: bool) -> dict:
    desc, cfg_path, overrides = VARIANTS[key]
    run_dir = RUNS / key
    dd = ["--data-dir", data_dir] if data_dir else []
    if train_it:  # exactly the recorded command; --resume continues a stopped run
        cmd = _lipmargin() + train_command(key)[1:] + ["--resume", *dd]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    log = [json.loads(ln) for ln in (run_dir / "log.jsonl").read_text().splitlines()]
    OUT.mkdir(parents=True, exist_ok=True)
    cert_json = OUT / f"{key}_certify.json"
    subprocess.run(
        _lipmargin() + ["certify", str(run_dir), "--eps", *EPS, "--json", str(cert_json), *dd],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    cert = json.loads(cert_json.read_text())
    result = {
        "key": key,
        "description": desc,
        "config": cfg_path,
        "overrides": overrides,
        "command": shlex.join(train_command(key)),
        "epochs": log[-1]["epoch"],
        "train_seconds_logged": sum(r["seconds"] for r in log),
        "median_epoch_seconds": statistics.median(r["seconds"] for r in log),
        "final_train_accuracy": log[-1]["train_accuracy"],
        "certification": {k: v for k, v in cert.items() if k not in ("curve", "layers")},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
    }
    audit_json = OUT / f"{key}_audit.json"
    if audit_n:  # the command a user runs; exit status 1 means a broken certificate
        cmd = ["audit", str(run_dir), "--n", str(audit_n), "--json", str(audit_json), *dd]
        subprocess.run(_lipmargin() + cmd, check=False, cwd=ROOT, stdout=subprocess.DEVNULL)
    if audit_json.exists():
        a = json.loads(audit_json.read_text())
        result["audit"] = {k: a[k] for k in ("n", "n_certified", "broken") if k in a}
        result["audit"]["gradient_ratio_max"] = a.get("gradient_lower_over_certified_max")
    (OUT / f"{key}.json").write_text(json.dumps(result, indent=2))
    return result


def _rows() -> dict[str, dict]:
    return ablate_mnist._rows(OUT)


_audit_cell = ablate_mnist._audit_cell


def section() -> str:
    rows = _rows()
    lines = [
        START,
        "## Issue 15: losses beside LMT",
        "",
        "Produced by `python scripts/losses_mnist.py --data-dir data --audit-n 1000` (one run at "
        "a time, OMP_NUM_THREADS=1, on a 2-core x86_64 CPU shared with other jobs). Wong-Kolter "
        "net with MaxMin, 10 power-iteration steps per update, Adam lr 1e-3, 25 epochs with lr "
        "x0.1 after epochs 17 and 22 unless the row says otherwise; for every loss the training "
        "radius eps is the config's `c`. Full MNIST test set (10,000 points), guaranteed bound "
        "(`lipmargin certify`, Prop. 2 radii); audit = `lipmargin audit --n 1000` (PGD + C&W "
        "inside every certified radius). Train time is the sum of the logged epoch times.",
        "",
        "| variant | epochs | clean | cert. 0.5 | cert. 1.0 | cert. 1.58 | cert. 2.0 "
        "| median radius | final train acc. | train time (min) | audit: broken / certified |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += ablate_mnist.variant_rows(rows, VARIANTS, minutes=".1f")
    if NOTES:
        lines += ["", *NOTES]
    lines += ["", "Commands (each run then certified and audited as above):", ""]
    for key in VARIANTS:
        if key in rows:
            lines.append(f"- `{key}`: `{rows[key]['command']}`")
    lines.append(END)
    return "\n".join(lines)


def write_section() -> str:
    """Replace (or append) the block between the losses markers of docs/ABLATION.md."""
    path = ROOT / "docs" / "ABLATION.md"
    text = path.read_text() if path.exists() else ""
    block = section()
    if START in text and END in text:
        a, b = text.index(START), text.index(END) + len(END)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
    return block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--only", nargs="*", default=None, choices=list(VARIANTS))
    ap.add_argument("--audit-n", type=int, default=0)
    ap.add_argument("--skip-train", action="store_true", help="certify existing runs only")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    if not args.table_only:
        for key in args.only or list(VARIANTS):
            r = run_variant(key, args.data_dir, args.audit_n, not args.skip_train)
            c = r["certification"]
            print(key, c["clean_accuracy"], c["certified_accuracy"], c["median_radius"], flush=True)
    print(write_section())


if __name__ == "__main__":
    main()
