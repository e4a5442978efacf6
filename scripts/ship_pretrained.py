"""Ship a trained run as a pretrained model of the package, with its model card.

Certifies the model on the FULL MNIST test set (guaranteed bound; clean and certified accuracy
at 0.5 / 1.0 / 1.58 / 2.0, median radius), audits the first ``--audit-n`` test points with the
attacks of ``lipmargin audit`` (PGD + C&W inside every certified radius), and writes
``src/lipmargin/pretrained/<name>.safetensors`` (weights and power-iteration vectors, no
optimizer state) with its sidecar and ``<name>.card.json``.

Usage: python scripts/ship_pretrained.py RUN NAME --data-dir data --command "lipmargin train ..."
       python scripts/ship_pretrained.py --readme-only   (rewrite the README table from the cards)
The README block between ``<!-- pretrained:start -->`` and ``<!-- pretrained:end -->`` is
rewritten from every card after each run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from pathlib import Path

import torch

from lipmargin import __version__, pretrained
from lipmargin.audit import audit
from lipmargin.certify import batches, evaluate
from lipmargin.data import load_dataset
from lipmargin.runs import load_run, read_log, save_run_checkpoint

EPS = (0.5, 1.0, 1.58, 2.0)
README = Path(__file__).resolve().parents[1] / "README.md"


def readme_table() -> str:
    """The README table of every shipped model, from the cards."""
    lines = [
        "| name | clean | cert. 0.5 | cert. 1.0 | cert. 1.58 | cert. 2.0 | median radius "
        "| training (min) | audit: broken / certified |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in pretrained.list():
        c = pretrained.card(name)
        t = c["test_set"]
        cert = " | ".join(f"{100 * t['certified_accuracy'][str(e)]:.2f}" for e in EPS)
        a = c["audit"]
        lines.append(
            f"| `{name}` | {100 * t['clean_accuracy']:.2f} | {cert} | {t['median_radius']:.3f} "
            f"| {c['training_minutes']} | {a['broken']} / {a['certified']} (first {a['n']}) |"
        )
    return "\n".join(lines)


def write_readme() -> None:
    text = README.read_text()
    start, end = "<!-- pretrained:start -->", "<!-- pretrained:end -->"
    i, j = text.index(start), text.index(end)
    README.write_text(text[: i + len(start)] + "\n" + readme_table() + "\n" + text[j:])


def certify_full(model, bound, data_dir: str) -> dict:
    x, y = load_dataset("mnist", "test", data_dir)
    report = evaluate(model, bound, batches(x, y, 1000), EPS)
    return {
        "n": report.n,
        "clean_accuracy": report.clean_accuracy,
        "certified_accuracy": {str(e): report.certified_accuracy[e] for e in EPS},
        "median_radius": report.median_radius,
        "lipschitz_bound": report.lipschitz,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", nargs="?")
    ap.add_argument("name", nargs="?")
    ap.add_argument("--readme-only", action="store_true")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--audit-n", type=int, default=1000)
    ap.add_argument("--command", help="the training command, for the card")
    ap.add_argument("--description", default="")
    args = ap.parse_args()
    if args.readme_only:
        write_readme()
        return
    if not (args.run and args.name and args.command):
        ap.error("RUN, NAME and --command are required (or --readme-only)")
    torch.manual_seed(0)
    model, bound, cfg, _, meta = load_run(args.run)
    log = read_log(args.run)
    target = pretrained.DIR / f"{args.name}.safetensors"
    save_run_checkpoint(
        target,
        model,
        bound,
        None,
        {"config": dataclasses.asdict(cfg), "epoch": meta.get("epoch")},
        cfg,
    )
    model, bound, _, _, _ = load_run(target)  # what users will load
    figures = certify_full(model, bound, args.data_dir)
    x, y = load_dataset("mnist", "test", args.data_dir)
    n = args.audit_n
    result = audit(model, bound, batches(x[:n], y[:n], 250), seed=0)
    card = {
        "name": args.name,
        "description": args.description,
        "dataset": "mnist",
        "input_shape": [1, 28, 28],
        "config": dataclasses.asdict(cfg),
        "training_command": args.command,
        "epochs": meta.get("epoch"),
        "training_minutes": round(sum(r.get("seconds", 0.0) for r in log) / 60.0, 1),
        "test_set": figures,
        "audit": {
            "n": result.n,
            "certified": result.n_certified,
            "broken": len(result.broken),
            "gradient_lower_over_certified_max": result.gradient_ratio_max,
        },
        "sha256": pretrained.sha256(target),
        "lipmargin": __version__,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    (pretrained.DIR / f"{args.name}.card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=2))
    write_readme()


if __name__ == "__main__":
    main()
