"""The run folder: the one module that creates, refuses, resumes and reads training runs.

A run folder written by ``lipmargin train`` holds

* ``config.json``: the run's current configuration (written atomically);
* ``last.safetensors`` + ``last.json``: the checkpoint (model weights, power-iteration vectors,
  optimizer state; the sidecar holds the config, epoch, step, metrics and resume history). The
  safetensors header carries the architecture fingerprint (model name, keyword arguments, module
  types, parameter names and shapes, hashed with the weights), covered by the file's sha256, so a
  sidecar edited to another architecture with the same shapes is detected on load;
* ``log.jsonl``: one JSON record per finished epoch.

:func:`plan_run` decides, without writing anything, whether a training call may use a folder:
an existing run is refused unless ``resume`` (the configs are compared; only
:data:`RESUMABLE_KEYS` may change) or ``overwrite`` (the old folder is renamed aside with a
timestamp, never deleted). :func:`start_run` then applies the plan. :func:`load_run` rebuilds a
trained model from a folder or checkpoint; :func:`load_user_model` loads a user's
``file.py:factory`` with weights in any common layout.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import pickle
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, models
from .bounds import LipschitzBound
from .checkpoint import CHECKPOINT_KEY, load_checkpoint, load_into, save_checkpoint, sidecar_path
from .config import TrainConfig, check_device_name, config_from_dict
from .data import absolute_dataset_spec, dataset_info
from .errors import CheckpointError, ConfigError, InputError, RunFolderError
from .outputs import check_writable, write_text_atomic

#: The checkpoint file of a run folder.
CHECKPOINT_NAME = "last.safetensors"
#: Files whose presence makes a folder an existing run.
RUN_FILES = (CHECKPOINT_NAME, "last.json", "log.jsonl", "config.json")
#: Config keys a resumed run may change: the length of training, the learning-rate schedule,
#: the per-epoch evaluation, the device, the data pipeline's mechanics (``loader`` and
#: ``num_workers`` give the same batches) and the display name. Anything else (model, optimizer,
#: loss, data, augmentation, mixed precision) would make the checkpoint and the config describe
#: different trainings.
RESUMABLE_KEYS = (
    "name",
    "epochs",
    "lr",
    "lr_milestones",
    "lr_gamma",
    "eval_eps",
    "eval_n",
    "device",
    "power_every",
    "bound_every",
    "lazy_gradient",
    "power_method",
    "loader",
    "num_workers",
)
#: Prefix of the training (not averaged) weights in a checkpoint written with ``ema_decay``.
TRAINING_PREFIX = "train."
#: Keys of the architecture fingerprint in the safetensors header.
_ARCH_KEY = "lipmargin.architecture"
_FINGERPRINT_KEY = "lipmargin.fingerprint"


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


def _is_user_spec(name: str) -> bool:
    return ":" in name and name.rsplit(":", 1)[0].endswith(".py")


def absolute_user_spec(name: str) -> str:
    """``path/to/file.py:factory`` with the path made absolute (registered names unchanged), so
    a run's config still finds the file from another working directory."""
    if not _is_user_spec(name):
        return name
    file_part, factory = name.rsplit(":", 1)
    return f"{Path(file_part).expanduser().resolve()}:{factory}"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside a ``torch.compile`` wrapper (``._orig_mod``), else ``model``."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def _model_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    info = dataset_info(cfg.dataset)
    kwargs = dict(cfg.model_kwargs)
    if not _is_user_spec(cfg.model):
        kwargs.setdefault("in_channels", info["shape"][0])
        kwargs.setdefault("input_size", info["shape"][1])
        kwargs.setdefault("num_classes", info["num_classes"])
    return kwargs


def build_model(cfg: TrainConfig) -> tuple[nn.Module, tuple[int, ...]]:
    """The configured model (unwrapped if the factory compiled it) and its input shape
    (C, H, W), sized for the dataset."""
    model = unwrap_model(models.build(cfg.model, **_model_kwargs(cfg)))
    return model, tuple(dataset_info(cfg.dataset)["shape"])


def architecture(model: nn.Module, cfg: TrainConfig) -> dict[str, Any]:
    """What identifies the network beyond its weights: model name, keyword arguments, the type
    of every submodule (an activation swap with equal shapes shows here), parameter and buffer
    names with shapes."""
    return {
        "model": cfg.model,
        "model_kwargs": _model_kwargs(cfg),
        "modules": [f"{name}:{type(m).__name__}" for name, m in model.named_modules()],
        "tensors": {k: list(v.shape) for k, v in model.state_dict().items()},
    }


def fingerprint(arch: dict[str, Any], weights: dict[str, torch.Tensor]) -> str:
    """sha256 of the architecture description and the weights (sorted by name)."""
    h = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    for key in sorted(weights):
        t = weights[key].detach().to("cpu").contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted names of the entries where two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                out.append(name)
            else:
                out += _differences(a[key], b[key], name)
        return out
    return [] if a == b else [prefix or "(value)"]


# --------------------------------------------------------------------------------------------
# optimizer state: flat tensors + JSON scalars, nothing pickled
# --------------------------------------------------------------------------------------------


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam, SGD or SGD with Nesterov momentum, per ``cfg``."""
    wd = cfg.weight_decay
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=wd)
    nesterov = cfg.optimizer == "nesterov"
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov, weight_decay=wd
    )


def _optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as flat tensors (safetensors) plus JSON-able scalars: nothing pickled."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    """Load the optimizer state saved by :func:`save_run_checkpoint`.

    Raises:
        CheckpointError: the checkpoint has no optimizer state or it does not fit ``opt``.
    """
    saved = meta.get("optimizer")
    if not isinstance(saved, dict) or "param_groups" not in saved:
        raise CheckpointError("the checkpoint holds no optimizer state: it cannot be resumed")
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in saved.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    try:
        opt.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(
            f"the checkpoint's optimizer state does not fit {type(opt).__name__}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


def save_run_checkpoint(
    path: Path,
    model: nn.Module,
    bound: LipschitzBound,
    opt: torch.optim.Optimizer | None,
    meta: dict[str, Any],
    cfg: TrainConfig,
    training_model: nn.Module | None = None,
) -> None:
    """Model weights, power-iteration vectors and optimizer state in one safetensors file, the
    architecture fingerprint in its header, ``meta`` (plus the fingerprint) in the sidecar.
    With weight averaging, ``model`` is the averaged model (what ``load_run`` returns and
    certificates cover) and ``training_model`` the one the optimizer moves (``train.*``
    tensors, read back by ``--resume`` only)."""
    weights = model.state_dict()
    tensors = {f"model.{k}": v for k, v in weights.items()}
    if training_model is not None:
        tensors.update({f"{TRAINING_PREFIX}{k}": v for k, v in training_model.state_dict().items()})
    tensors.update({f"bound.{k}": v for k, v in bound.state_dict().items()})
    arch = architecture(model, cfg)
    digest = fingerprint(arch, weights)
    meta = {**meta, "fingerprint": digest}
    if opt is not None:
        opt_tensors, opt_meta = _optimizer_state(opt)
        tensors.update(opt_tensors)
        meta["optimizer"] = opt_meta
    header = {_ARCH_KEY: json.dumps(arch, sort_keys=True), _FINGERPRINT_KEY: digest}
    save_checkpoint(path, tensors, meta, header=header)


def _check_architecture(
    path: str | Path, model: nn.Module, cfg: TrainConfig, weights: dict, meta: dict
) -> None:
    """Refuse a checkpoint whose sidecar config builds another network than the one saved."""
    header = meta.get(CHECKPOINT_KEY, {}).get("tensor_metadata", {}) or {}
    if _ARCH_KEY not in header:  # written before fingerprints existed
        return
    try:
        saved = json.loads(header[_ARCH_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: unreadable architecture record: {exc}") from exc
    now = architecture(model, cfg)
    diff = _differences(saved, now)
    if diff:
        raise CheckpointError(
            f"{path}: the sidecar's config builds a different network than the one saved "
            f"(differs in {', '.join(diff[:5])}); was last.json edited?"
        )
    if fingerprint(saved, weights) != header.get(_FINGERPRINT_KEY):
        raise CheckpointError(f"{path}: the weights do not match the architecture fingerprint")


def load_run(
    path: str | Path, *, device: str | torch.device = "auto"
) -> tuple[nn.Module, LipschitzBound, TrainConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Rebuild a model trained by lipmargin from a run folder, a checkpoint file or
    ``pretrained:NAME`` (a model shipped with the package, ``lipmargin.pretrained``).

    Returns ``(model in eval mode, bound with the trained power-iteration vectors, config,
    all stored tensors, sidecar metadata)``, model and bound on ``device`` (``"auto"``: cuda
    when available, else cpu; see :func:`resolve_device`).

    Raises:
        CheckpointError: missing or corrupt checkpoint, no config in the sidecar, weights that
            do not fit, or a sidecar config that builds another architecture than the saved one.
        ConfigError: the stored config is invalid or names an unknown model.
    """
    if str(path).startswith("pretrained:"):  # a model shipped with the package
        from . import pretrained

        path = pretrained.path(str(path))
    dev = resolve_device(device)
    tensors, meta = load_checkpoint(path)
    if "config" not in meta:
        raise CheckpointError(f"{path}: no training config in the checkpoint's sidecar")
    cfg = config_from_dict(meta["config"])
    model, shape = build_model(cfg)
    sub = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        load_into(model, sub)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: weights do not match model {cfg.model!r}: {exc}") from exc
    _check_architecture(path, model, cfg, sub, meta)
    model.to(dev).eval()
    bound = LipschitzBound(
        model,
        shape,
        power_steps=cfg.power_steps,
        power_method=cfg.power_method,
        power_every=cfg.power_every,
        bound_every=cfg.bound_every,
        lazy_gradient=cfg.lazy_gradient,
    ).to(dev)
    bound.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("bound.")})
    check_same_device(model, bound)
    return model, bound, cfg, tensors, meta


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (cpu for a model with none)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def check_same_device(model: nn.Module, bound: LipschitzBound) -> None:
    """Refuse a bound whose power-iteration vectors are on another device than the model (the
    model was moved after the bound was built): ``bound.to(device)`` fixes it.

    Raises:
        InputError: naming both devices.
    """
    dev = model_device(model)
    for name, buf in bound.named_buffers():
        if buf.device != dev:
            raise InputError(
                f"the bound's power-iteration vector {name} is on {buf.device} but the model is "
                f"on {dev}: call bound.to({str(dev)!r}) after moving the model"
            )


def load_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The training config stored in a run's checkpoint sidecar (verified), as a dict.

    Raises:
        CheckpointError: missing or corrupt checkpoint, or no config in its sidecar.
    """
    _, meta = load_checkpoint(path)
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path}: no training config in the checkpoint's sidecar")
    return meta["config"]


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint (what ``resume`` continues from)."""
    return (Path(run_dir) / CHECKPOINT_NAME).is_file()


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``log.jsonl`` (empty when there is none)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def append_log(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Append one epoch's record to ``log.jsonl``."""
    with open(Path(run_dir) / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------------------------
# creating, refusing, resuming
# --------------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    """What :func:`start_run` will do with a run folder; made by :func:`plan_run`."""

    run_dir: Path
    cfg: TrainConfig
    resume: bool = False
    overwrite_existing: bool = False
    start_epoch: int = 0
    step: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    changes: dict[str, list[Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    moved_to: Path | None = None

    @property
    def nothing_to_do(self) -> bool:
        """A resumed run that has already trained ``cfg.epochs`` epochs."""
        return self.resume and self.start_epoch >= self.cfg.epochs


def _existing_run_files(run_dir: Path) -> list[str]:
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None): ``cuda`` when this torch build sees a GPU, else ``cpu``; anything
    else is checked usable by :func:`check_device`.

    Raises:
        ConfigError: a malformed name, or a device this machine cannot use.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device_name(device)
    check_device(device)
    return torch.device(device)


def check_device(device: str) -> None:
    """Refuse a device this torch build cannot use (``cuda`` on a CPU build)."""
    if device == "auto":
        return
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={device!r} but this torch build has no usable CUDA "
            f'(torch {torch.__version__}); use device="cpu"'
        )
    if kind == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ConfigError(f"device={device!r} but MPS is not available here")
    index = torch.device(device).index
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise ConfigError(
            f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )


def plan_run(
    run_dir: str | Path, cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False
) -> RunPlan:
    """Decide, without writing anything, how a training call uses ``run_dir``.

    * a folder holding a run (any of :data:`RUN_FILES`) is refused unless ``resume`` or
      ``overwrite``;
    * ``resume`` needs a checkpoint; the config is compared with the checkpoint's: a change of
      a key outside :data:`RESUMABLE_KEYS` is refused (naming the keys), ``epochs`` below the
      finished epoch is refused, the allowed changes are returned to be recorded;
    * the folder (or its nearest existing parent) must be writable.

    Raises:
        RunFolderError: an existing run without ``resume``/``overwrite``, ``resume`` without a
            checkpoint, both flags, an unwritable folder, or an incompatible config change.
        CheckpointError: the checkpoint to resume is corrupt.
    """
    run_dir = Path(run_dir)
    cfg = replace(
        cfg, model=absolute_user_spec(cfg.model), dataset=absolute_dataset_spec(cfg.dataset)
    )
    check_device(cfg.device)
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other: choose one")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} exists and is not a folder")
    check_writable(run_dir / CHECKPOINT_NAME, what="run folder")
    existing = _existing_run_files(run_dir) if run_dir.is_dir() else []
    plan = RunPlan(run_dir=run_dir, cfg=cfg, resume=resume)
    if not resume:
        if existing and not overwrite:
            raise RunFolderError(
                f"{run_dir} already holds a run ({', '.join(existing)}): pass --resume to "
                "continue it, --overwrite to start again (the old folder is kept, renamed "
                "with a timestamp), or another --out"
            )
        plan.overwrite_existing = bool(existing)
        return plan
    ckpt = run_dir / CHECKPOINT_NAME
    if not ckpt.is_file():
        raise RunFolderError(
            f"--resume: no checkpoint {ckpt} (is --out right?); train without --resume to start"
        )
    tensors, meta = load_checkpoint(ckpt)
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{ckpt}: no training config in the checkpoint's sidecar")
    old = config_from_dict(meta["config"]).to_dict()
    new = cfg.to_dict()
    keys = sorted(set(old) | set(new))
    diff = {k: [old.get(k), new.get(k)] for k in keys if old.get(k) != new.get(k)}
    refused = [k for k in diff if k not in RESUMABLE_KEYS]
    if refused:
        shown = "; ".join(f"{k}: {diff[k][0]!r} -> {diff[k][1]!r}" for k in refused[:6])
        raise RunFolderError(
            f"cannot resume {run_dir}: the config changes {', '.join(refused)} ({shown}); a "
            f"resumed run may change only {', '.join(RESUMABLE_KEYS)}; train into another --out "
            "or pass --overwrite"
        )
    done = int(meta.get("epoch", 0))
    if cfg.epochs < done:
        raise RunFolderError(
            f"cannot resume {run_dir}: it has already trained {done} epochs, more than "
            f"epochs={cfg.epochs}; raise epochs (e.g. --set epochs={done + 10}) to train further"
        )
    plan.start_epoch, plan.step = done, int(meta.get("step", 0))
    plan.tensors, plan.meta, plan.changes = tensors, meta, diff
    plan.history = list(meta.get("resumes", []))
    if diff and not plan.nothing_to_do:
        plan.history.append({"at_epoch": done, "changes": diff})
    return plan


def _aside_name(run_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    candidate = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while candidate.exists():
        n += 1
        candidate = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
    return candidate


def start_run(plan: RunPlan) -> None:
    """Apply a plan (rank 0 only): move an overwritten run aside, create the folder, write
    ``config.json`` and start or trim ``log.jsonl`` to the resumed epoch."""
    run_dir = plan.run_dir
    if plan.overwrite_existing:
        plan.moved_to = _aside_name(run_dir)
        os.replace(run_dir, plan.moved_to)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.json", json.dumps(plan.cfg.to_dict(), indent=2) + "\n")
    kept = [r for r in read_log(run_dir) if r.get("epoch", 0) <= plan.start_epoch]
    kept = kept if plan.resume else []
    write_text_atomic(run_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in kept))


def checkpoint_meta(
    plan: RunPlan, epoch: int, step: int, record: dict[str, Any], shape: tuple[int, ...]
) -> dict[str, Any]:
    """The sidecar metadata of a run checkpoint after ``epoch``."""
    meta: dict[str, Any] = {
        "config": plan.cfg.to_dict(),
        "epoch": epoch,
        "step": step,
        "bound": record.get("bound"),
        "input_shape": list(shape),
        "metrics": record,
        "lipmargin": __version__,
    }
    if plan.history:
        meta["resumes"] = plan.history
    return meta


def describe_plan(plan: RunPlan) -> str | None:
    """One line saying what a plan does beyond a plain fresh start, or None."""
    if plan.moved_to is not None:
        return f"previous run in {plan.run_dir} moved to {plan.moved_to}"
    if not plan.resume:
        return None
    changed = ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in plan.changes.items())
    if plan.nothing_to_do:
        return (
            f"{plan.run_dir} has already trained {plan.start_epoch} of {plan.cfg.epochs} epochs: "
            f"nothing to train (raise epochs to continue)"
        )
    return f"resuming {plan.run_dir} after epoch {plan.start_epoch}" + (
        f"; changed: {changed}" if changed else ""
    )


# --------------------------------------------------------------------------------------------
# user models and their weights
# --------------------------------------------------------------------------------------------


def _strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def normalise_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """A plain state dict from the common layouts: ``{"state_dict": ...}`` (or
    ``model_state_dict``/``model``) unwrapped, ``module.`` (DataParallel/DDP) and ``_orig_mod.``
    (``torch.compile``) prefixes removed.

    Raises:
        CheckpointError: ``obj`` is not a mapping of names to tensors.
    """
    if isinstance(obj, nn.Module):
        raise CheckpointError(
            f"{source} holds a whole pickled model; save model.state_dict() instead"
        )
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(f"{source} does not hold a state dict (names -> tensors)")
    for prefix in ("module.", "_orig_mod.", "module."):
        obj = _strip_prefix(obj, prefix)
    return obj


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights for a user model: a lipmargin checkpoint (with sidecar), a plain safetensors
    file, or a torch state dict read with ``weights_only=True`` (nothing is unpickled with code
    execution), normalised by :func:`normalise_state_dict`.

    Raises:
        CheckpointError: missing or unreadable file, a pickled whole model, not a state dict.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"weights file not found: {p}")
    if p.suffix == ".json" or (p.suffix == ".safetensors" and sidecar_path(p).exists()):
        tensors = load_checkpoint(p)[0]
        if any(k.startswith("model.") for k in tensors):
            tensors = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        return normalise_state_dict(tensors, str(p))
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return normalise_state_dict(load_file(str(p)), str(p))
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"cannot read safetensors file {p}: {_first_line(exc)}") from exc
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{p} holds pickled Python objects (a whole model?), which lipmargin will not "
            "unpickle; save model.state_dict() instead"
        ) from exc
    except Exception as exc:
        raise CheckpointError(f"cannot read weights {p}: {_first_line(exc)}") from exc
    return normalise_state_dict(obj, str(p))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def load_user_model(spec: str, weights: str | Path, *, strict: bool = True) -> nn.Module:
    """Build ``path/to/file.py:factory`` (unwrapping ``torch.compile``), load ``weights`` into
    it and put it in eval mode.

    Raises:
        ConfigError: the factory cannot be loaded or called.
        CheckpointError: the weights cannot be read or do not fit (one line naming the first
            missing, unexpected or mis-shaped keys).
    """
    model = unwrap_model(models.build(spec))
    state = load_weights(weights)
    try:
        load_into(model, state, strict=strict)
    except CheckpointError as exc:
        raise CheckpointError(f"{weights}: {exc}") from exc
    return model.eval()
