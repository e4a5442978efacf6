"""Ship a trained run as a pretrained model of the package, with its model card.

Certifies the model on the FULL MNIST test set (guaranteed bound; clean and certified accuracy
at 0.5 / 1.0 / 1.58 / 2.0, median radius), audits the first ``--audit-n`` test points with the
attacks of ``lipmargin audit`` (PGD + C&W inside every certified radius), and writes
``src/lipmargin/pretrained/<name>.safetensors`` (weights and power-iteration vectors, no
optimizer state) with its sidecar and ``<name>.card.json``.

Usage: python scripts/ship_pretrained.py RUN NAME --data-dir data --command "lipmargin train ..."
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform

import torch

from lipmargin import __version__, pretrained
from lipmargin.audit import audit
from lipmargin.certify import batches, evaluate
from lipmargin.data import load_dataset
from lipmargin.runs import load_run, read_log, save_run_checkpoint

EPS = (0.5, 1.0, 1.58, 2.0)


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
    ap.add_argument("run")
    ap.add_argument("name")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--audit-n", type=int, default=1000)
    ap.add_argument("--command", required=True, help="the training command, for the card")
    ap.add_argument("--description", default="")
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
