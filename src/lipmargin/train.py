"""The training loop: LMT (paper Alg. 1) and the paper's baselines, single process or DDP.

Read top to bottom: set-up, data, model and bound, optimiser, resume, then one loop over
epochs; each epoch ends with an evaluation on held-out points and an atomic checkpoint.
Run with ``torchrun --nproc-per-node N -m lipmargin train ...`` for DistributedDataParallel
(gloo on CPU, nccl on GPU): every rank takes its slice of each global batch, the power-iteration
vectors are broadcast from rank 0 after every step so they stay identical, only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import __version__, models
from .bounds import LipschitzBound
from .certify import batches, evaluate
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import dataset_info, load_dataset
from .errors import CheckpointError
from .losses import CSchedule, lmt_loss, margin_loss, parseval_retraction, spectral_norm_penalty


def build_model(cfg: TrainConfig) -> tuple[nn.Module, tuple[int, ...]]:
    """The configured model and its input shape (C, H, W), sized for the dataset."""
    info = dataset_info(cfg.dataset)
    kwargs = dict(cfg.model_kwargs)
    if ":" in cfg.model:  # a user's path/to/file.py:factory
        return models.build(cfg.model, **kwargs), tuple(info["shape"])
    kwargs.setdefault("in_channels", info["shape"][0])
    kwargs.setdefault("input_size", info["shape"][1])
    kwargs.setdefault("num_classes", info["num_classes"])
    return models.build(cfg.model, **kwargs), tuple(info["shape"])


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    wd = cfg.weight_decay
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=wd)
    nesterov = cfg.optimizer == "nesterov"
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov, weight_decay=wd
    )


def _lr_at(cfg: TrainConfig, epoch: int) -> float:
    return cfg.lr * cfg.lr_gamma ** sum(1 for m in cfg.lr_milestones if epoch >= m)


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


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world


def save_run_checkpoint(
    path: Path,
    model: nn.Module,
    bound: LipschitzBound,
    opt: torch.optim.Optimizer | None,
    meta: dict[str, Any],
) -> None:
    """Model weights, power-iteration vectors and optimizer state in one safetensors file."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"bound.{k}": v for k, v in bound.state_dict().items()})
    if opt is not None:
        opt_tensors, opt_meta = _optimizer_state(opt)
        tensors.update(opt_tensors)
        meta = {**meta, "optimizer": opt_meta}
    save_checkpoint(path, tensors, meta)


def load_run(
    path: str | Path, *, device: str = "cpu"
) -> tuple[nn.Module, LipschitzBound, TrainConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Rebuild a model trained by lipmargin from a run folder or checkpoint file."""
    from .config import config_from_dict

    tensors, meta = load_checkpoint(path)
    if "config" not in meta:
        raise CheckpointError(f"{path}: no training config in the checkpoint's sidecar")
    cfg = config_from_dict(meta["config"])
    model, shape = build_model(cfg)
    sub = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(sub)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match model {cfg.model!r}: {exc}") from exc
    model.to(device).eval()
    bound = LipschitzBound(model, shape, power_steps=cfg.power_steps)
    bound.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("bound.")})
    return model, bound, cfg, tensors, meta


def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train per ``cfg`` into ``run_dir``; returns the last epoch's log record."""
    rank, world = _distributed()
    run_dir = Path(run_dir)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)

    # data: whole splits in memory; the held-out points are the first eval_n test points
    x_train, y_train = load_dataset(cfg.dataset, "train", data_dir)
    if cfg.train_subset:
        x_train, y_train = x_train[: cfg.train_subset], y_train[: cfg.train_subset]
    x_test, y_test = load_dataset(cfg.dataset, "test", data_dir)
    x_test, y_test = x_test[: cfg.eval_n], y_test[: cfg.eval_n]
    steps_per_epoch = math.ceil(x_train.shape[0] / cfg.batch_size)

    model, shape = build_model(cfg)
    model.to(device)
    bound = LipschitzBound(model, shape, power_steps=cfg.power_steps).to(device)
    opt = _optimizer(cfg, model)
    schedule = CSchedule(cfg.c, cfg.c0, cfg.c_warmup_epochs, steps_per_epoch)
    start_epoch, step = 0, 0
    ckpt = run_dir / "last.safetensors"
    if resume and ckpt.exists():
        model_r, bound_r, _, tensors, meta = load_run(ckpt, device=cfg.device)
        model.load_state_dict(model_r.state_dict())
        bound.load_state_dict(bound_r.state_dict())
        _restore_optimizer(opt, tensors, meta["optimizer"])
        start_epoch, step = int(meta["epoch"]), int(meta["step"])
    elif resume and rank == 0:
        print(f"no checkpoint in {run_dir}; starting from scratch")
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model)

    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        log_path = run_dir / "log.jsonl"
        kept = []
        if log_path.exists() and resume:
            kept = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in kept if json.loads(ln)["epoch"] <= start_epoch]
        log_path.write_text("".join(ln + "\n" for ln in kept))

    record: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        lr = _lr_at(cfg, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        # Everything random in an epoch (order, attack starts) is seeded by (seed, epoch), so a
        # resumed run repeats exactly what the killed run would have done.
        torch.manual_seed(cfg.seed * 100003 + epoch)
        order = torch.randperm(x_train.shape[0])
        net.train()
        bound.train()
        total_loss, total_correct, seen = 0.0, 0, 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not progress or rank != 0,
            leave=False,
        )
        for i in bar:
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            idx = idx[rank::world] if world > 1 else idx
            xb, yb = x_train[idx].to(device), y_train[idx].to(device)
            c = schedule(step)
            loss, logits = _loss(cfg, net, model, bound, xb, yb, c)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if cfg.method == "parseval":
                parseval_retraction(model, cfg.parseval_beta)
            if world > 1:
                for buf in bound.buffers():
                    dist.broadcast(buf, 0)
            step += 1
            total_loss += float(loss.detach()) * yb.shape[0]
            total_correct += int((logits.argmax(1) == yb).sum())
            seen += yb.shape[0]
            if i % 20 == 0:
                bar.set_postfix(loss=f"{total_loss / seen:.4f}", c=f"{c:.3g}")

        model.eval()
        report = evaluate(model, bound, batches(x_test, y_test, 500, device), [cfg.eval_eps])
        record = {
            "epoch": epoch + 1,
            "step": step,
            "loss": total_loss / max(seen, 1),
            "train_accuracy": total_correct / max(seen, 1),
            "clean_accuracy": report.clean_accuracy,
            "certified_accuracy": report.certified_accuracy[float(cfg.eval_eps)],
            "eval_eps": cfg.eval_eps,
            "median_radius": report.median_radius,
            "bound": report.lipschitz,
            **_bound_gap(bound),
            "c": schedule(step),
            "lr": lr,
            "seconds": time.perf_counter() - t0,
        }
        if rank == 0:
            meta = {
                "config": cfg.to_dict(),
                "epoch": epoch + 1,
                "step": step,
                "bound": report.lipschitz,
                "input_shape": list(shape),
                "metrics": record,
                "lipmargin": __version__,
            }
            save_run_checkpoint(ckpt, model, bound, opt, meta)
            with open(run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if progress:
                print(
                    f"epoch {epoch + 1:3d}  loss {record['loss']:.4f}  "
                    f"clean {record['clean_accuracy']:.4f}  "
                    f"cert@{cfg.eval_eps:g} {record['certified_accuracy']:.4f}  "
                    f"median r {record['median_radius']:.3f}  bound {record['bound']:.3g}  "
                    f"{record['seconds']:.1f}s",
                    flush=True,
                )
    if world > 1:
        dist.barrier()
    return record


def _bound_gap(bound: LipschitzBound) -> dict[str, float]:
    """The largest training-time estimate (last mini-batch) next to the guaranteed bound.

    Both are the largest entry of the pairwise K[t, i] (Prop. 2) when the net has a linear head,
    else the global bound (Prop. 1). A guaranteed bound far above the estimate means one power-
    iteration step per update no longer tracks the weights (learning rate too large).
    """
    estimate = getattr(bound, "last_estimate", None)
    if estimate is None:
        return {}
    cert = bound.certified()
    guaranteed = cert.value if cert.pairwise is None or estimate.dim() == 0 else cert.pairwise.max()
    return {"train_estimate": float(estimate.max()), "guaranteed_max": float(guaranteed)}


def _loss(
    cfg: TrainConfig,
    net: nn.Module,
    model: nn.Module,
    bound: LipschitzBound,
    xb: torch.Tensor,
    yb: torch.Tensor,
    c: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One mini-batch loss for the configured method; returns (loss, logits)."""
    if cfg.method == "adversarial":
        from .attacks import pgd_l2

        model.eval()
        adv = pgd_l2(model, xb, yb, cfg.adv_eps, steps=cfg.adv_steps, restarts=1).x_adv
        model.train()
        logits = net(adv)
        return F.cross_entropy(logits, yb), logits
    logits = net(xb)
    if cfg.method == "lmt":
        k = bound(pairwise=cfg.lmt_form == "pairwise")
        if cfg.loss != "lmt":
            return margin_loss(cfg.loss, logits, yb, k, c, **_loss_kwargs(cfg)), logits
        return lmt_loss(logits, yb, k, c, release_factor=cfg.release_factor), logits
    loss = F.cross_entropy(logits, yb)
    if cfg.method == "snr":
        bound(pairwise=False)
        loss = loss + spectral_norm_penalty(bound.last_sigmas, cfg.snr_lambda)
    return loss, logits


def _loss_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """Hyper-parameters of the configured margin loss (issue 15), by ``cfg.loss``."""
    if cfg.loss == "gloro":
        return {"trades_lambda": cfg.trades_lambda, "anchor": cfg.gloro_anchor}
    if cfg.loss == "emma":
        return {"floor": cfg.emma_floor}
    if cfg.loss == "cll":
        return {
            "p": cfg.cll_p,
            "lip_decay": cfg.cll_lip_decay,
            "detach_bound": cfg.cll_detach_bound,
        }
    return {}
