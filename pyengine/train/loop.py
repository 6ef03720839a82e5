"""The training loop: presets, optimisers and schedules, AMP, masks after every step, progress."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyengine.train.dist import all_reduce_sum


@dataclass
class TrainConfig:
    """One training run's schedule. ``PRESETS`` holds the published recipes."""

    epochs: int = 160
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "multistep"  # multistep | cosine | constant
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of the epochs (80/120 of 160)
    gamma: float = 0.1
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True  # on CUDA
    workers: int = 2
    augment: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, TrainConfig] = {
    # EGP / EASIER / IMP papers on CIFAR: SGD 0.1, momentum 0.9, wd 1e-4 (EGP) / 5e-4, steps 80/120
    "paper": TrainConfig(),
    # Swin-T on CIFAR-10 (EGP): same schedule with lr 1e-3
    "swin": TrainConfig(lr=1e-3),
    # ViT of the sparse double descent study: AdamW 1e-4, wd 0.03, cosine, 200 epochs
    "vit": TrainConfig(epochs=200, optimizer="adamw", lr=1e-4, weight_decay=0.03, schedule="cosine"),
    # A CPU demo that finishes in minutes: few epochs, cosine decay (and 16x16 images, see
    # PruneConfig.image_size); ResNet-18 reaches ~94% on digits after the 3 dense epochs
    "quick": TrainConfig(epochs=3, batch_size=32, lr=0.01, weight_decay=5e-4, schedule="cosine", workers=0),
}


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=False)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adamw")


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """A per-step LambdaLR: linear warm-up, then multistep / cosine / constant."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = cfg.warmup_epochs * steps_per_epoch
    marks = [int(round(m * cfg.epochs)) * steps_per_epoch for m in cfg.milestones]

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.schedule == "multistep":
            return cfg.gamma ** sum(step >= m for m in marks)
        if cfg.schedule == "cosine":
            t = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if cfg.schedule == "constant":
            return 1.0
        raise ValueError(f"unknown schedule {cfg.schedule!r}; choose multistep, cosine or constant")

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _autocast(device: torch.device, cfg: TrainConfig):
    enabled = cfg.amp and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _to_device(x, y, device: torch.device, cfg: TrainConfig):
    """Moves a batch to the device; images go channels-last on CUDA when the config asks."""
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if device.type == "cuda" and cfg.channels_last and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    return x, y


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, cfg: TrainConfig | None = None) -> dict:
    """Top-1 accuracy (%) and mean cross-entropy over a loader (summed over DDP ranks)."""
    cfg = cfg or TrainConfig(amp=False)
    was = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for x, y in loader:
        x, y = _to_device(x, y, device, cfg)
        with _autocast(device, cfg):
            out = model(x)
        loss_sum += float(F.cross_entropy(out.float(), y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        total += y.numel()
    model.train(was)
    loss_sum, correct, total = all_reduce_sum([loss_sum, float(correct), float(total)], device)
    return {"acc": 100.0 * correct / max(1, total), "loss": loss_sum / max(1, total), "n": int(total)}


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class EpochHooks:
    """Optional callbacks of :func:`train_epochs`."""

    on_epoch_end: Callable[[int, dict], None] | None = None
    extra_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    before_epoch: Callable[[int], None] | None = None
    tags: dict = field(default_factory=dict)


def train_epochs(model: nn.Module, loader, device: torch.device, cfg: TrainConfig, optimizer, scheduler, *,
                 start_epoch: int = 0, masks=None, hooks: EpochHooks | None = None, progress: bool = True,
                 desc: str = "train", loss_fn: LossFn | None = None) -> list[dict]:
    """Trains from ``start_epoch`` to ``cfg.epochs``; masks are re-applied after every step.

    loss_fn(logits, targets, inputs) replaces cross-entropy (e.g. distillation).
    Returns one metrics dict per epoch run; ``hooks.on_epoch_end`` is where checkpoints go.
    """
    from tqdm.auto import tqdm

    hooks = hooks or EpochHooks()
    history = []
    if masks is not None:
        masks.apply(optimizer)
    for epoch in range(start_epoch, cfg.epochs):
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        if hooks.before_epoch:
            hooks.before_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        seen = correct = 0
        loss_sum = 0.0
        bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not progress,
                   dynamic_ncols=True, mininterval=1.0)
        for x, y in bar:
            x, y = _to_device(x, y, device, cfg)
            with _autocast(device, cfg):
                out = model(x)
                if loss_fn is not None:
                    loss = loss_fn(out.float(), y, x)
                else:
                    loss = F.cross_entropy(out.float(), y, label_smoothing=cfg.label_smoothing)
                if hooks.extra_loss is not None:
                    loss = loss + hooks.extra_loss(model, x, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {float(loss)} at epoch {epoch + 1}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if masks is not None:
                # one fused call: pruned weights, their gradients and optimiser buffers -> 0, so
                # neither momentum nor weight decay can revive a pruned weight next step
                masks.apply(optimizer)
            scheduler.step()
            n = y.numel()
            seen += n
            loss_sum += float(loss.detach()) * n
            correct += int((out.argmax(1) == y).sum())
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}", lr=f"{scheduler.get_last_lr()[0]:.3g}")
        bar.close()
        loss_sum, correct, seen = all_reduce_sum([loss_sum, float(correct), float(seen)], device)
        rec = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen), "train_acc": 100 * correct / max(1, seen),
               "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0, **hooks.tags}
        history.append(rec)
        if hooks.on_epoch_end:
            hooks.on_epoch_end(epoch + 1, rec)
    return history


def with_overrides(cfg: TrainConfig, **kw) -> TrainConfig:
    """A copy of cfg with the given fields replaced (None values are ignored)."""
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})
