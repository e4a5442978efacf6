"""The training loop: LMT (paper Alg. 1) and the paper's baselines, single process or DDP.

Read top to bottom: set-up, data, model and bound, optimiser, resume, then one loop over
epochs; each epoch ends with an evaluation on held-out points and an atomic checkpoint.

Device: ``cfg.device`` (``"auto"``: cuda when available). Data: the index batches of an epoch
come from :func:`lipmargin.data.epoch_batches` (``DistributedSampler`` order); they are read
from the in-memory split (``loader = "memory"``, the faster on a CPU) or by a ``DataLoader``
with ``num_workers`` workers and pinned memory (``"dataloader"``, the default on a GPU and for
image folders); either way the batches are identical. Augmentation (``augment``) runs on the
device after the copy. Mixed precision (``amp = "bf16" | "fp16"``): only the model's forward
pass runs under ``torch.autocast``; the logits are cast to float32 and the bound (and every
certificate) stays float32 / float64; fp16 uses a gradient scaler.

Run with ``torchrun --nproc-per-node N -m lipmargin train ...`` for DistributedDataParallel
(gloo on CPU, nccl on GPU, rank r on ``cuda:LOCAL_RANK``): every rank reads its share of each
global batch (a ``DistributedSampler``), the power-iteration vectors are broadcast from rank 0
after every step so they stay identical, the logged loss and accuracy are all-reduced, only
rank 0 writes. ``sync_batchnorm = true`` computes BatchNorm statistics over all ranks.
"""

from __future__ import annotations

import copy
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
from .data import augment_batch, epoch_batches, get_dataset, load_dataset, make_loader
from .errors import ConfigError
from .losses import CSchedule, lmt_loss, margin_loss, parseval_retraction, spectral_norm_penalty
from .runs import build_model, load_run  # noqa: F401  (their home is runs.py; kept importable)

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _lr_at(cfg: TrainConfig, epoch: int) -> float:
    return cfg.lr * cfg.lr_gamma ** sum(1 for m in cfg.lr_milestones if epoch >= m)


def _distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """``(rank, world size, this rank's device)``. Under torchrun a CUDA run puts rank r on
    ``cuda:LOCAL_RANK`` (``torch.cuda.set_device``) and uses nccl; a CPU run uses gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} CUDA "
                "device(s): start at most that many processes per node"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


def sync_batchnorm_view(model: nn.Module) -> nn.Module:
    """A copy of the module tree with every BatchNorm replaced by ``nn.SyncBatchNorm``, sharing
    all parameters and buffers with ``model`` (which is left untouched, so the bound keeps
    tracing and watching the original modules; training updates the shared tensors)."""

    def shallow(m: nn.Module) -> nn.Module:
        c = copy.copy(m)
        c._modules = {k: (None if v is None else shallow(v)) for k, v in m._modules.items()}
        return c

    return nn.SyncBatchNorm.convert_sync_batchnorm(shallow(model))


def _grad_scaler(device: torch.device, enabled: bool) -> Any:
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # pragma: no cover  (torch < 2.3)


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
    rank, world, device = _distributed(runs.resolve_device(cfg.device))
    plan = runs.plan_run(run_dir, cfg, resume=resume, overwrite=overwrite)
    cfg, run_dir = plan.cfg, plan.run_dir
    if plan.nothing_to_do:
        if rank == 0:
            print(runs.describe_plan(plan), flush=True)
        return dict(plan.meta.get("metrics", {}))
    if cfg.sync_batchnorm and world > 1 and device.type != "cuda":
        raise ConfigError("sync_batchnorm needs CUDA devices (SyncBatchNorm runs on GPUs only)")
    torch.manual_seed(cfg.seed)
    amp_dtype = _AMP_DTYPES.get(cfg.amp)

    # data: a Dataset per split; the held-out points are the first eval_n test points
    use_loader = cfg.loader == "dataloader" or (
        cfg.loader == "auto" and (device.type != "cpu" or cfg.dataset.startswith("folder:"))
    )
    train_set = get_dataset(
        cfg.dataset, "train", data_dir, lazy=use_loader, subset=cfg.train_subset
    )
    n_train = len(train_set)  # type: ignore[arg-type]
    x_test, y_test = load_dataset(cfg.dataset, "test", data_dir)
    x_test, y_test = x_test[: cfg.eval_n], y_test[: cfg.eval_n]
    order_seed = cfg.seed * 100003
    steps_per_epoch = len(epoch_batches(n_train, cfg.batch_size, seed=0, epoch=0, world=world))

    model, shape = build_model(cfg)
    model.to(device)
    bound = LipschitzBound(
        model,
        shape,
        power_steps=cfg.power_steps,
        power_method=cfg.power_method,
        power_every=cfg.power_every,
        bound_every=cfg.bound_every,
        lazy_gradient=cfg.lazy_gradient,
    ).to(device)
    opt = runs.make_optimizer(cfg, model)
    scaler = _grad_scaler(device, enabled=cfg.amp == "fp16")
    schedule = CSchedule(cfg.c, cfg.c0, cfg.c_warmup_epochs, steps_per_epoch)
    start_epoch, step = plan.start_epoch, plan.step
    averaged = WeightAverage(model, cfg.ema_decay, shape) if cfg.ema_decay > 0 else None
    if plan.resume:
        model_r, bound_r, _, tensors, meta = load_run(run_dir / runs.CHECKPOINT_NAME, device="cpu")
        if averaged is not None:
            averaged.load(model_r.state_dict(), tensors)
        else:
            model.load_state_dict(model_r.state_dict())
        bound.load_state_dict(bound_r.state_dict())
        runs.restore_optimizer(opt, tensors, meta)
    runs.check_same_device(model, bound)
    net: nn.Module = model
    if world > 1:
        inner = sync_batchnorm_view(model) if cfg.sync_batchnorm else model
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(inner, device_ids=ids)
        dist.barrier()  # every rank has checked the folder before rank 0 changes it

    if rank == 0:
        runs.start_run(plan)
        message = runs.describe_plan(plan)
        if message:
            print(message, flush=True)
    bars = progress and rank == 0 and sys.stderr.isatty()
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64

    record: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        lr = _lr_at(cfg, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        # Everything random in an epoch (order, augmentation, attack starts) is seeded by
        # (seed, epoch), so a resumed run repeats exactly what the killed run would have done.
        torch.manual_seed(order_seed + epoch)
        index_batches = epoch_batches(
            n_train, cfg.batch_size, seed=order_seed, epoch=epoch, rank=rank, world=world
        )
        if use_loader:
            pin = device.type == "cuda"
            source: Any = make_loader(
                train_set, index_batches, num_workers=cfg.num_workers, pin_memory=pin
            )
        else:
            source = (train_set[idx] for idx in index_batches)
        aug_gen = torch.Generator(device=device).manual_seed((order_seed + epoch) * 1009 + rank)
        net.train()
        bound.train()
        # running sums stay on the device: no host synchronisation per step
        totals = torch.zeros(2, dtype=acc_dtype, device=device)  # loss * n, correct
        seen = 0
        bar = tqdm(
            source,
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not bars,
            leave=False,
        )
        for i, (xb, yb) in enumerate(bar):
            xb = xb.to(device, non_blocking=True)
            yb = yb.to(device, non_blocking=True)
            xb = augment_batch(xb, cfg.augment, aug_gen)
            c = schedule(step)
            loss, logits = _loss(cfg, net, model, bound, xb, yb, c, amp_dtype)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if cfg.method == "parseval":
                parseval_retraction(model, cfg.parseval_beta)
            if averaged is not None:
                averaged.update()
            if world > 1:
                for buf in bound.buffers():
                    dist.broadcast(buf, 0)
            step += 1
            with torch.no_grad():
                totals[0] += loss.detach().to(acc_dtype) * yb.shape[0]
                totals[1] += (logits.argmax(1) == yb).sum().to(acc_dtype)
            seen += yb.shape[0]
            if bars and i % 20 == 0:  # the only per-step synchronisation, with bars shown
                bar.set_postfix(loss=f"{float(totals[0]) / seen:.4f}", c=f"{c:.3g}")

        summed = torch.cat([totals, torch.tensor([seen], dtype=acc_dtype, device=device)])
        if world > 1:  # the logged loss and accuracy are those of the whole global batch
            dist.all_reduce(summed)
        total_loss, total_correct, seen = summed.cpu().tolist()
        model.eval()
        evaluated, eval_bound = (model, bound) if averaged is None else averaged.pair()
        report = evaluate(
            evaluated, eval_bound, batches(x_test, y_test, 500, device), [cfg.eval_eps]
        )
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
            if averaged is None:
                runs.save_run_checkpoint(
                    run_dir / runs.CHECKPOINT_NAME, model, bound, opt, meta, cfg
                )
            else:
                runs.save_run_checkpoint(
                    run_dir / runs.CHECKPOINT_NAME,
                    averaged.model,
                    bound,
                    opt,
                    meta,
                    cfg,
                    training_model=model,
                )
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


class WeightAverage:
    """Exponential moving average of a model's weights (Polyak averaging; the "EMA of weights"
    of issue 15): after every optimizer step ``avg <- decay * avg + (1 - decay) * w`` for each
    parameter, buffers (BatchNorm statistics) copied. The averaged model is an ordinary model:
    its certificates come from its own ``LipschitzBound`` (a guaranteed bound of the averaged
    weights, not of the training ones). Built on ``torch.optim.swa_utils.AveragedModel``."""

    def __init__(self, model: nn.Module, decay: float, shape: tuple[int, ...]) -> None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.training_model = model
        self._avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.model = self._avg.module
        self._bound = LipschitzBound(self.model, shape)

    def update(self) -> None:
        self._avg.update_parameters(self.training_model)
        with torch.no_grad():
            for mine, theirs in zip(
                self.model.buffers(), self.training_model.buffers(), strict=True
            ):
                mine.copy_(theirs)

    def pair(self) -> tuple[nn.Module, LipschitzBound]:
        """The averaged model (evaluation mode) and its bound."""
        self.model.eval()
        return self.model, self._bound

    def load(self, averaged: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
        """Resume: the averaged weights, and the training ones from the ``train.*`` tensors."""
        prefix = runs.TRAINING_PREFIX
        training = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not training:
            raise ConfigError(
                "this checkpoint holds no training weights (written without ema_decay): "
                "it cannot be resumed with weight averaging"
            )
        self.training_model.load_state_dict(training)
        self.model.load_state_dict(averaged)
        self._avg.n_averaged.fill_(1)  # averaging continues from the saved average


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
    amp_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One mini-batch loss for the configured method; returns (loss, float32 logits).

    With ``amp_dtype`` only the model's forward pass runs under ``torch.autocast``; the bound's
    power iteration, the LMT loss and the attacks stay in float32."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        if amp_dtype is None:
            return net(x)
        with torch.autocast(x.device.type, dtype=amp_dtype):
            out = net(x)
        return out.float()

    if cfg.method == "adversarial":
        from .attacks import pgd_l2

        model.eval()
        adv = pgd_l2(model, xb, yb, cfg.adv_eps, steps=cfg.adv_steps, restarts=1).x_adv
        model.train()
        logits = forward(adv)
        return F.cross_entropy(logits, yb), logits
    logits = forward(xb)
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
