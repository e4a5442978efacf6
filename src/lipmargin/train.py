"""The training loop: LMT (paper Alg. 1) and the paper's baselines, single process or DDP.

Read top to bottom: set-up, data, model and bound, optimiser, resume, then one loop over
epochs; each epoch ends with an evaluation on held-out points and an atomic checkpoint.
Run with ``torchrun --nproc-per-node N -m lipmargin train ...`` for DistributedDataParallel
(gloo on CPU, nccl on GPU): every rank takes its slice of each global batch, the power-iteration
vectors are broadcast from rank 0 after every step so they stay identical, only rank 0 writes.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import runs
from .bounds import LipschitzBound
from .certify import batches, evaluate
from .config import TrainConfig
from .data import load_dataset
from .losses import CSchedule, lmt_loss, parseval_retraction, spectral_norm_penalty
from .runs import build_model, load_run  # noqa: F401  (their home is runs.py; kept importable)


def _lr_at(cfg: TrainConfig, epoch: int) -> float:
    return cfg.lr * cfg.lr_gamma ** sum(1 for m in cfg.lr_milestones if epoch >= m)


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world


def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train per ``cfg`` into ``run_dir``; returns the last epoch's log record.

    ``run_dir`` is used as :func:`lipmargin.runs.plan_run` decides: an existing run is refused
    unless ``resume`` (continue from its checkpoint; only ``runs.RESUMABLE_KEYS`` may differ
    from the checkpoint's config) or ``overwrite`` (the old folder is renamed aside). Nothing is
    written before the data, the model and the checkpoint to resume have loaded. ``progress``
    prints one line per epoch and shows progress bars (only when stderr is a terminal).
    """
    rank, world = _distributed()
    plan = runs.plan_run(run_dir, cfg, resume=resume, overwrite=overwrite)
    cfg, run_dir = plan.cfg, plan.run_dir
    if plan.nothing_to_do:
        if rank == 0:
            print(runs.describe_plan(plan), flush=True)
        return dict(plan.meta.get("metrics", {}))
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
    bound = LipschitzBound(
        model, shape, power_steps=cfg.power_steps, power_every=cfg.power_every
    ).to(device)
    opt = runs.make_optimizer(cfg, model)
    schedule = CSchedule(cfg.c, cfg.c0, cfg.c_warmup_epochs, steps_per_epoch)
    start_epoch, step = plan.start_epoch, plan.step
    if plan.resume:
        model_r, bound_r, _, tensors, meta = load_run(run_dir / runs.CHECKPOINT_NAME)
        model.load_state_dict(model_r.state_dict())
        bound.load_state_dict(bound_r.state_dict())
        runs.restore_optimizer(opt, tensors, meta)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model)
        dist.barrier()  # every rank has checked the folder before rank 0 changes it

    if rank == 0:
        runs.start_run(plan)
        message = runs.describe_plan(plan)
        if message:
            print(message, flush=True)
    bars = progress and rank == 0 and sys.stderr.isatty()

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
            disable=not bars,
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

        if world > 1:  # the logged loss and accuracy are those of the whole global batch
            totals = torch.tensor([total_loss, total_correct, seen], dtype=torch.float64)
            totals = totals.to(device)
            dist.all_reduce(totals)
            total_loss, total_correct, seen = totals.cpu().tolist()
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
            meta = runs.checkpoint_meta(plan, epoch + 1, step, record, shape)
            runs.save_run_checkpoint(run_dir / runs.CHECKPOINT_NAME, model, bound, opt, meta, cfg)
            runs.append_log(run_dir, record)
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
    return record if rank == 0 else {}


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
        return lmt_loss(logits, yb, k, c, release_factor=cfg.release_factor), logits
    loss = F.cross_entropy(logits, yb)
    if cfg.method == "snr":
        bound(pairwise=False)
        loss = loss + spectral_norm_penalty(bound.last_sigmas, cfg.snr_lambda)
    return loss, logits
