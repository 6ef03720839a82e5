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
    # ViT of the sparse double descent study (ICIAP 2023, SDD_ViT): AdamW 1e-4, wd 0.03, cosine,
    # 200 epochs, batch 512 (and dropout 0.1 in the model: runner.PRESET_MODEL_OPTS)
    "vit": TrainConfig(epochs=200, batch_size=512, optimizer="adamw", lr=1e-4, weight_decay=0.03, schedule="cosine"),
    # A CPU demo that finishes in minutes: few epochs, cosine decay (and 16x16 images, see
    # RunConfig.image_size); ResNet-18 reaches ~94% on digits after the 3 dense epochs
    "quick": TrainConfig(epochs=3, batch_size=32, lr=0.01, weight_decay=5e-4, schedule="cosine", workers=0),
}


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=False)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adamw")


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int, start_epoch: int = 0):
    """A per-step LambdaLR: linear warm-up, then multistep / cosine / constant. ``start_epoch``:
    the schedule starts that many epochs in (weight rewinding to epoch k resumes it at k)."""
    offset = start_epoch * steps_per_epoch
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = cfg.warmup_epochs * steps_per_epoch
    marks = [int(round(m * cfg.epochs)) * steps_per_epoch for m in cfg.milestones]

    def factor(step: int) -> float:
        step += offset
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
    total = 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in loader:
        x, y = _to_device(x, y, device, cfg)
        with _autocast(device, cfg):
            out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum").double()
        correct += (out.argmax(1) == y).sum()
        total += y.numel()
    model.train(was)
    loss_sum, correct, total = all_reduce_sum([float(loss_sum), float(correct), float(total)], device)
    return {"acc": 100.0 * correct / max(1, total), "loss": loss_sum / max(1, total), "n": int(total)}


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class EpochHooks:
    """Optional per-epoch callbacks of :func:`train_epochs` (per-step ones are StepCallbacks)."""

    on_epoch_end: Callable[[int, dict], None] | None = None
    before_epoch: Callable[[int], None] | None = None
    tags: dict = field(default_factory=dict)


class _ProgressLine:
    """A tqdm bar on a terminal, cleared at the epoch's end; in a log that is not a terminal,
    nothing per batch. Either way the caller prints one line per epoch."""

    def __init__(self, loader, desc: str, enabled: bool, total: int | None = None):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(loader, desc=desc, total=total, leave=False, dynamic_ncols=True, mininterval=1.0)
        self.iterable = self.bar if self.bar is not None else loader

    def show(self, **kw) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**kw, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


#: None: check the loss every step on the CPU, once per epoch on a GPU; True/False forces either way
DEFER_NONFINITE_CHECK: bool | None = None


def progress_enabled(progress: bool | None) -> bool:
    """``None`` means: bars only when stderr is a terminal."""
    import sys

    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)


def train_epochs(model: nn.Module, loader, device: torch.device, cfg: TrainConfig, optimizer, scheduler, *,
                 start_epoch: int = 0, masks=None, hooks: EpochHooks | None = None, progress: bool | None = None,
                 desc: str = "train", loss_fn: LossFn | None = None, callbacks=(), log=None,
                 max_steps: int | None = None) -> list[dict]:
    """Trains from ``start_epoch`` to ``cfg.epochs``; masks are re-applied after every step.

    loss_fn(logits, targets, inputs) replaces cross-entropy (e.g. distillation); ``callbacks``
    are StepCallback objects (pyengine.methods.base) called at batch start, for the loss, after
    backward and after the optimiser step. Running metrics stay on the device and are read once
    per epoch; a non-finite loss raises FloatingPointError naming the epoch and step where it
    first happened (checked every step on the CPU, once per epoch on a GPU, where a per-step check
    would cost a host sync). ``log`` gets one line per epoch when no progress bar is shown.
    ``max_steps`` caps the steps per epoch (default: the whole loader).
    Returns one metrics dict per epoch run; ``hooks.on_epoch_end`` is where checkpoints go.
    """
    hooks = hooks or EpochHooks()
    callbacks = list(callbacks)
    where = f"{desc}: " if desc and desc != "train" else ""  # which training run ("round 2/3"), if named
    show_bar = progress_enabled(progress)
    history = []
    steps_per_epoch = len(loader) if max_steps is None else min(len(loader), max_steps)
    sync_each_step = device.type != "cuda" if DEFER_NONFINITE_CHECK is None else not DEFER_NONFINITE_CHECK
    if masks is not None:
        masks.apply(optimizer)
    for cb in callbacks:
        cb.on_train_start(model)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
            if hooks.before_epoch:
                hooks.before_epoch(epoch)
            for cb in callbacks:
                cb.on_epoch_start(epoch, cfg.epochs)
            model.train()
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            first_bad = torch.full((), -1, dtype=torch.int64, device=device)
            seen = 0
            bar = _ProgressLine(loader, f"{desc} epoch {epoch + 1}/{cfg.epochs}", show_bar, steps_per_epoch)
            refresh = max(1, steps_per_epoch // 20)
            for step, (x, y) in enumerate(bar.iterable):
                if step >= steps_per_epoch:
                    break
                x, y = _to_device(x, y, device, cfg)
                for cb in callbacks:
                    cb.on_batch_start(step, x, y)
                optimizer.zero_grad(set_to_none=True)
                done = None
                for cb in callbacks:
                    done = cb.forward_backward(model, x, y)
                    if done is not None:
                        break
                if done is None:
                    with _autocast(device, cfg):
                        out = model(x)
                        logits = out.float()  # once: under autocast each .float() is a new copy
                        loss = None
                        for cb in callbacks:
                            loss = cb.loss(logits, y, x)
                            if loss is not None:
                                break
                        if loss is None:
                            loss = loss_fn(logits, y, x) if loss_fn is not None else \
                                F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                        for cb in callbacks:
                            extra = cb.extra_loss(logits, y, x)
                            if extra is not None:
                                loss = loss + extra
                    loss.backward()
                    loss = loss.detach()
                else:
                    loss, out = done
                    loss = torch.as_tensor(loss, device=device).detach()
                bad = ~torch.isfinite(loss)
                if sync_each_step:
                    if bool(bad):
                        raise FloatingPointError(f"{where}the loss became {float(loss)} at epoch {epoch + 1}, step {step + 1} "
                                                 f"of {steps_per_epoch}; lower the learning rate (--lr)")
                else:
                    first_bad = torch.where(bad & (first_bad < 0), step, first_bad)
                for cb in callbacks:
                    cb.after_backward(model)
                optimizer.step()
                if masks is not None:
                    # one fused call: pruned weights, their gradients and optimiser buffers -> 0, so
                    # neither momentum nor weight decay can revive a pruned weight next step
                    masks.apply(optimizer)
                for cb in callbacks:
                    cb.after_step(model, optimizer)
                scheduler.step()
                n = y.numel()
                seen += n
                loss_sum += loss.double() * n
                correct += (out.detach().argmax(1) == y).sum()
                if bar.bar is not None and (step % refresh == 0 or step == steps_per_epoch - 1):
                    bar.show(loss=f"{float(loss_sum) / seen:.3f}", acc=f"{100 * int(correct) / seen:.1f}",
                             lr=f"{scheduler.get_last_lr()[0]:.3g}")
            bar.close()
            if not sync_each_step and int(first_bad) >= 0:
                raise FloatingPointError(f"{where}the loss became non-finite at epoch {epoch + 1}, step {int(first_bad) + 1} "
                                         f"of {steps_per_epoch}; lower the learning rate (--lr)")
            loss_v, correct_v, seen_v = all_reduce_sum([float(loss_sum), float(correct), float(seen)], device)
            rec = {"epoch": epoch + 1, "train_loss": loss_v / max(1, seen_v), "train_acc": 100 * correct_v / max(1, seen_v),
                   "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0, **hooks.tags}
            history.append(rec)
            if log is not None:  # on a terminal too, once the bar is cleared: the epochs stay on screen
                log(f"{desc} epoch {epoch + 1}/{cfg.epochs}: loss {rec['train_loss']:.4f}  acc {rec['train_acc']:.2f}%  "
                    f"lr {rec['lr']:.3g}  {rec['seconds']:.1f} s")
            if hooks.on_epoch_end:
                hooks.on_epoch_end(epoch + 1, rec)
    finally:
        for cb in callbacks:
            cb.on_train_end(model)
    return history


def with_overrides(cfg: TrainConfig, **kw) -> TrainConfig:
    """A copy of cfg with the given fields replaced (None values are ignored)."""
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})
