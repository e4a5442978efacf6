"""Training configuration as plain data: a TOML file plus ``--set key=value`` overrides."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .bounds.graph import LAZY_GRADIENTS, POWER_METHODS
from .errors import ConfigError
from .losses import LOSSES

AUGMENTATIONS = ("none", "shift", "crop", "crop-flip")  # data.AUGMENTATIONS
LOADERS = ("auto", "memory", "dataloader")
AMP_MODES = ("none", "bf16", "fp16")
METHODS = ("lmt", "plain", "weight_decay", "snr", "parseval", "adversarial")
OPTIMIZERS = ("adam", "sgd", "nesterov")


@dataclass
class TrainConfig:
    """Every knob of a training run. Defaults are the paper's MNIST set-up (Sec. 6.1)."""

    name: str = "mnist-lmt"
    dataset: str = "mnist"
    model: str = "wong_kolter"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    method: str = "lmt"
    # LMT (paper Alg. 1): c constant, or linear warm-up c0 -> c over c_warmup_epochs.
    c: float = 1.0
    c0: float | None = None
    c_warmup_epochs: float = 0.0
    lmt_form: str = "pairwise"  # "pairwise" (Prop. 2) or "global" (Prop. 1)
    release_factor: bool = True
    power_steps: int = 1  # power-iteration steps per update (paper Alg. 1: 1)
    power_method: str = "power"  # "power" (paper Alg. 1) or "lanczos" (top Ritz vector)
    power_every: int = 1  # power-iteration update every k training steps (sigma every step)
    # lazy bound: the graph walked every k training steps only (issue 16); the steps between
    # use a held first-order model of the bound ("held") or the held bound with the computed
    # steps' gradient scaled by k ("scaled", lazy regularization)
    bound_every: int = 1
    lazy_gradient: str = "held"
    # margin loss of method "lmt" (issue 15), eps = c above (with its warm-up): "lmt" (paper
    # Alg. 1), "gloro" (Leino et al. 2021), "emma" (Hu et al. 2023), "cll" (Losch et al. 2023)
    loss: str = "lmt"
    trades_lambda: float = 0.0  # gloro: weight of the TRADES (KL) term; 0 = plain GloRo loss
    gloro_anchor: str = "label"  # gloro: bottom logit from the "label" or the "prediction"
    emma_floor: float = 0.01  # emma: lower clip of eps_i / eps
    cll_p: float = 0.3  # cll: logistic err_quantile p
    cll_lip_decay: float = 1e-4  # cll: weight of (max K[t, i])^2
    cll_detach_bound: bool = True  # cll: bound held constant in the calibrated term
    # baselines
    weight_decay: float = 0.0
    snr_lambda: float = 0.01
    parseval_beta: float = 1e-4
    adv_eps: float = 1.0
    adv_steps: int = 10
    # optimisation
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    epochs: int = 20
    batch_size: int = 50
    train_subset: int | None = None
    # evaluation each epoch, on held-out test points
    eval_eps: float = 1.58
    eval_n: int = 1000
    seed: int = 0
    # where and how: "auto" is cuda when available, else cpu (under torchrun: cuda:LOCAL_RANK)
    device: str = "auto"
    augment: str = "none"  # "none", "shift" (MNIST-like), "crop", "crop-flip" (CIFAR/SVHN-like)
    loader: str = "auto"  # "memory", "dataloader"; auto: memory on CPU, DataLoader on a GPU
    num_workers: int = 0  # DataLoader worker processes
    amp: str = "none"  # "bf16" or "fp16": the forward pass under torch.autocast, bound float32
    # exponential moving average of the weights (0: off). With it, evaluation, the saved model
    # and its certificates are those of the averaged weights (a guaranteed bound computed for
    # them); the raw training weights are kept in the checkpoint for --resume.
    ema_decay: float = 0.0
    sync_batchnorm: bool = False  # DDP: BatchNorm statistics over all ranks (SyncBatchNorm)

    def validate(self) -> TrainConfig:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for key in (
            "name",
            "dataset",
            "model",
            "method",
            "optimizer",
            "lmt_form",
            "device",
            "augment",
            "loader",
            "amp",
        ):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ConfigError(f"{key} must be a non-empty string, got {getattr(self, key)!r}")
        for key in ("release_factor", "sync_batchnorm"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")

        for key in (
            "epochs",
            "batch_size",
            "eval_n",
            "adv_steps",
            "seed",
            "power_steps",
            "power_every",
            "bound_every",
            "num_workers",
        ):
            if not is_int(getattr(self, key)):
                raise ConfigError(f"{key} must be an integer, got {getattr(self, key)!r}")
        for key in (
            "lr",
            "c",
            "weight_decay",
            "eval_eps",
            "lr_gamma",
            "momentum",
            "snr_lambda",
            "parseval_beta",
            "adv_eps",
            "c_warmup_epochs",
        ):
            if not is_num(getattr(self, key)):
                raise ConfigError(f"{key} must be a finite number, got {getattr(self, key)!r}")
        if self.train_subset is not None and not is_int(self.train_subset):
            raise ConfigError(f"train_subset must be an integer, got {self.train_subset!r}")
        if self.c0 is not None and not is_num(self.c0):
            raise ConfigError(f"c0 must be a number, got {self.c0!r}")
        if not isinstance(self.lr_milestones, list) or not all(
            is_int(m) for m in self.lr_milestones
        ):
            raise ConfigError(
                f"lr_milestones must be a list of integers, got {self.lr_milestones!r}"
            )
        if not isinstance(self.model_kwargs, dict):
            raise ConfigError("model_kwargs must be a table")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        self._validate_loss(is_num)
        if self.lmt_form not in ("pairwise", "global"):
            raise ConfigError(f"lmt_form must be 'pairwise' or 'global', got {self.lmt_form!r}")
        for key in (
            "lr",
            "c",
            "epochs",
            "batch_size",
            "eval_n",
            "eval_eps",
            "weight_decay",
            "momentum",
            "lr_gamma",
            "snr_lambda",
            "parseval_beta",
            "adv_eps",
            "c_warmup_epochs",
        ):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{key} must be a non-negative number, got {value!r}")
        for key in ("lr", "eval_eps", "lr_gamma"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be positive, got {getattr(self, key)!r}")
        if (
            not isinstance(self.ema_decay, (int, float))
            or isinstance(self.ema_decay, bool)
            or not (0 <= self.ema_decay < 1)
        ):
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.momentum >= 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.c0 is not None and self.c0 < 0:
            raise ConfigError(f"c0 must be non-negative, got {self.c0!r}")
        check_device_name(self.device)
        for key, allowed in (
            ("augment", AUGMENTATIONS),
            ("loader", LOADERS),
            ("amp", AMP_MODES),
            ("lazy_gradient", LAZY_GRADIENTS),
            ("power_method", POWER_METHODS),
        ):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers!r}")
        counts = (self.epochs, self.batch_size, self.eval_n, self.power_steps, self.power_every)
        if min(*counts, self.bound_every) < 1:
            raise ConfigError(
                "epochs, batch_size, eval_n, power_steps, power_every and bound_every must be at "
                "least 1"
            )
        if self.train_subset is not None and self.train_subset < 1:
            raise ConfigError("train_subset must be at least 1")
        return self

    def _validate_loss(self, is_num: Any) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.loss != "lmt" and self.method != "lmt":
            raise ConfigError(f"loss {self.loss!r} needs method 'lmt', got {self.method!r}")
        for key in ("trades_lambda", "emma_floor", "cll_p", "cll_lip_decay"):
            value = getattr(self, key)
            if not is_num(value) or value < 0:
                raise ConfigError(f"{key} must be a non-negative number, got {value!r}")
        if self.emma_floor > 1:
            raise ConfigError(f"emma_floor must lie in [0, 1], got {self.emma_floor!r}")
        if not 0 < self.cll_p < 1:
            raise ConfigError(f"cll_p must lie in (0, 1), got {self.cll_p!r}")
        if self.gloro_anchor not in ("label", "prediction"):
            raise ConfigError(
                f"gloro_anchor must be 'label' or 'prediction', got {self.gloro_anchor!r}"
            )
        if not isinstance(self.cll_detach_bound, bool):
            raise ConfigError(
                f"cll_detach_bound must be true or false, got {self.cll_detach_bound!r}"
            )
        if self.loss == "cll" and self.c == 0:
            raise ConfigError("loss 'cll' needs c > 0 (its temperature is 2 c / Q(p))")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_device_name(device: Any) -> str:
    """Refuse anything but ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (availability is
    checked where the device is used: :func:`lipmargin.runs.resolve_device`)."""
    bad = f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}"
    if not isinstance(device, str) or not device:
        raise ConfigError(bad)
    if device == "auto":
        return device
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(bad) from exc
    if kind not in ("cpu", "cuda", "mps"):
        raise ConfigError(bad)
    return device


_PYTHON_LITERALS = {"True": True, "False": False, "None": None}


def _parse_value(text: str) -> Any:
    """A ``--set`` value: JSON, else a TOML value (``true``, ``'s'``, ``1e-3``, ``[1, 2]``), else
    Python float syntax (``.001``, ``1.``) or ``True``/``False``/``None``, else the bare text
    as a string. The types are checked by :meth:`TrainConfig.validate`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    if text in _PYTHON_LITERALS:
        return _PYTHON_LITERALS[text]
    try:
        return float(text)
    except ValueError:
        return text


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> TrainConfig:
    """Read a TOML config (or ``base``, or the defaults) and apply ``key=value`` overrides
    (values as :func:`_parse_value` reads them)."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML in {p}: {exc}") from exc
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        data[key.strip()] = _parse_value(value.strip())
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
    try:
        cfg = TrainConfig(**data)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc
    return cfg.validate()
