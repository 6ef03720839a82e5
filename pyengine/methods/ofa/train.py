"""Training a once-for-all supernet: the full network, then progressive shrinking.

Phases (OFA, Cai et al. ICLR 2020, section 3.3; code ``train_ofa_net.py``; MOOFA the same):

1. ``full``: the largest subnet alone, cross-entropy with label smoothing; it becomes the
   teacher of every later phase.
2. ``kernel``: kernel sizes {3, 5, 7} sampled per block, largest expand and depth.
3. ``depth-1``, ``depth-2``: depths {3, 4}, then {2, 3, 4} (every kernel size, largest expand).
4. ``expand-1``, ``expand-2``: expand ratios {the two largest}, then all. Before each, the middle
   channels are re-sorted by importance (OFA's ``re_organize_middle_weights``; the MOOFA
   training script skips this call, the paper does not; pyengine re-sorts).

Every step draws one resolution and ``subnets_per_step`` subnets (1, 2, 4 for kernel, depth,
expand) from a ``random.Random`` seeded by (seed, phase, epoch, step) - so every DDP rank draws
the same ones - and accumulates their gradients before one optimiser step. The loss is
``CE(label-smoothed) + kd_ratio * soft-CE(teacher)``, the teacher in training mode as in OFA's
code. BatchNorm statistics are recalibrated on a fixed set of training images before any subnet
is evaluated. A state is saved after every epoch; ``resume`` continues at any phase and epoch
with the same result as an uninterrupted run.

The per-step logic is :func:`ofa_train_step`; :class:`OFATrainer` is the loop around it.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pyengine.models.ofa_mbv3 import MobileNetV3Subnet, OFAMobileNetV3, ofa_mbv3, subnet_layout
from pyengine.train.checkpoint import atomic_torch_save, atomic_write_text, load_state, save_model_export
from pyengine.train.dist import barrier, init_distributed, main_rank_first
from pyengine.train.loop import EpochHooks, TrainConfig, evaluate, train_epochs

from pyengine.methods import options as opts
from pyengine.methods.base import StepCallback
from pyengine.methods.options import OptionError, option
from pyengine.methods.runner import locked_run_folder, resolve_device, seed_everything
from pyengine.methods.ofa.memory import peak_memory_of_layout, subnet_macs
from pyengine.methods.ofa.spaces import Space, get_space

__all__ = [
    "Phase", "OFARecipe", "RECIPES", "OFATrainConfig", "OFATrainer", "ofa_train_step", "step_seed",
    "average_gradients", "recalibrate_bn", "evaluate_subnet", "build_phases", "load_supernet",
    "export_supernet", "resize_batch", "Resized", "QUICK_RESOLUTIONS", "build_data", "config_from_dict",
    "run_train", "resolve_device", "seed_everything",
]

PHASE_KINDS = ("full", "kernel", "depth", "expand")
QUICK_RESOLUTIONS = (32, 40, 48, 56)  # OFA's 128, 160, 192, 224 divided by 4 (digits: 8x8 upsampled)


# ---------------------------------------------------------------------------------- phases


@dataclass
class Phase:
    """One phase of progressive shrinking: its schedule and what a step samples."""

    name: str
    epochs: int  # after warm-up (OFA: n_epochs + warmup_epochs in all)
    lr: float
    warmup_epochs: int = 0
    warmup_lr: float | None = None  # default: lr (OFA's warmup_lr = -1)
    subnets_per_step: int = 1
    kernel_sizes: tuple[int, ...] | None = None  # None: every choice of the space
    expand_ratios: tuple[float, ...] | None = None
    depths: tuple[int, ...] | None = None
    distill: bool = True
    reorganize_stage: int | None = None  # expand phases: OFA's expand_ratio_stage
    # run-level settings every step needs (filled in by build_phases)
    resolutions: tuple[int, ...] = (224,)
    label_smoothing: float = 0.1
    kd_ratio: float = 1.0
    amp: bool = True

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.warmup_epochs


@dataclass
class OFARecipe:
    """Published schedules. ``phases`` maps a phase name to (epochs, lr per process at batch
    ``batch_size``, warm-up epochs); the lr is multiplied by the number of processes, as OFA's
    ``init_lr = base_lr * num_gpus``."""

    phases: dict[str, tuple[int, float, int]]
    subnets_per_step: dict[str, int] = field(default_factory=lambda: {"full": 1, "kernel": 1, "depth": 2, "expand": 4})
    batch_size: int = 64
    weight_decay: float = 3e-5  # not on BatchNorm parameters nor biases ("bn#bias")
    momentum: float = 0.9
    nesterov: bool = True
    label_smoothing: float = 0.1
    kd_ratio: float = 1.0
    calib_images: int = 2000  # BN recalibration subset (OFA: 2000 training images)
    augment: bool = True
    lr_per_process: bool = True  # multiply the rates by the number of processes (OFA's init_lr)


RECIPES: dict[str, OFARecipe] = {
    # OFA train_ofa_net.py; the full network's 180 epochs at 3e-2 per GPU from MOOFA's teacher config
    "ofa-imagenet": OFARecipe({"full": (180, 3e-2, 0), "kernel": (120, 3e-2, 5), "depth-1": (25, 2.5e-3, 0),
                               "depth-2": (120, 7.5e-3, 5), "expand-1": (25, 2.5e-3, 0), "expand-2": (120, 7.5e-3, 5)}),
    # MOOFA configs/config_MOOFA.yaml (10x lower progressive-shrinking rates than OFA's)
    "moofa-imagenet": OFARecipe({"full": (180, 3e-2, 0), "kernel": (120, 3e-3, 5), "depth-1": (25, 2.5e-4, 0),
                                 "depth-2": (120, 7.5e-4, 5), "expand-1": (25, 2.5e-4, 0), "expand-2": (120, 2.5e-4, 5)}),
    # a CPU demo on small images: minutes, not days
    "quick": OFARecipe({"full": (5, 0.1, 0), "kernel": (1, 0.03, 0), "depth-1": (1, 0.02, 0), "depth-2": (1, 0.03, 0),
                        "expand-1": (1, 0.02, 0), "expand-2": (2, 0.03, 0)},
                       batch_size=64, calib_images=300, augment=False, lr_per_process=False),
}


def _no_dropout(teacher: nn.Module) -> nn.Module:
    """The distillation teacher runs in train mode (its BatchNorm on batch statistics, as OFA's
    progressive shrinking does) but without dropout: OFA builds its teacher with dropout_rate 0."""
    for m in teacher.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return teacher


def build_phases(space: Space, recipe: OFARecipe, *, epochs: int | None = None, lr_scale: float = 1.0,
                 names: Sequence[str] | None = None, resolutions: Sequence[int] | None = None,
                 amp: bool = True) -> list[Phase]:
    """The phases of progressive shrinking for a space: full, kernel, then one depth phase and
    one expand phase per extra choice (OFA: two each), each adding the next smaller value."""
    a = space.arch
    kmax, emax, dmax = (max(a.kernel_sizes),), (max(a.expand_ratios),), (max(a.depths),)
    plan: list[tuple[str, dict]] = [("full", dict(kernel_sizes=kmax, expand_ratios=emax, depths=dmax, distill=False)),
                                    ("kernel", dict(kernel_sizes=a.kernel_sizes, expand_ratios=emax, depths=dmax))]
    d_desc, e_desc = sorted(a.depths, reverse=True), sorted(a.expand_ratios, reverse=True)
    for p in range(1, len(d_desc)):
        plan.append((f"depth-{p}", dict(kernel_sizes=a.kernel_sizes, expand_ratios=emax, depths=tuple(sorted(d_desc[:p + 1])))))
    for p in range(1, len(e_desc)):
        plan.append((f"expand-{p}", dict(kernel_sizes=a.kernel_sizes, expand_ratios=tuple(sorted(e_desc[:p + 1])),
                                         depths=a.depths, reorganize_stage=p - 1)))
    known = [n for n, _ in plan]
    if names is not None:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"--phases: unknown phase(s) {unknown}; this space has {known}")
        plan = [(n, kw) for n, kw in plan if n in set(names)]
    res = tuple(resolutions or space.resolutions)
    phases = []
    for name, kw in plan:
        if name not in recipe.phases:
            raise ValueError(f"the recipe has no schedule for phase {name!r} (it has {sorted(recipe.phases)})")
        ep, lr, warm = recipe.phases[name]
        if epochs is not None:
            ep, warm = epochs, 0
        kind = name.split("-")[0]
        phases.append(Phase(name, ep, lr * lr_scale, warm, None, recipe.subnets_per_step.get(kind, 1), resolutions=res,
                            label_smoothing=recipe.label_smoothing, kd_ratio=recipe.kd_ratio, amp=amp, **kw))
    return phases


def training_resolutions(resolutions: Sequence[int], continuous: bool = True, step: int = 4) -> tuple[int, ...]:
    """OFA samples every multiple of 4 between the smallest and largest resolution while
    training (``continuous_size``), the listed ones otherwise."""
    lo, hi = min(resolutions), max(resolutions)
    if continuous:
        sizes = tuple(s for s in range(lo, hi + 1) if s % step == 0)
        if sizes:
            return sizes
    return tuple(sorted(set(resolutions)))


# ---------------------------------------------------------------------------------- one step


def step_seed(seed: int, phase: int, epoch: int, step: int) -> int:
    """The seed of one training step, the same on every process."""
    return ((((seed * 1_000_003) + phase) * 1_000_003 + epoch) * 1_000_003 + step) % (2 ** 62)


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class Resized(nn.Module):
    """Runs ``net`` on inputs resized to ``size`` x ``size`` (evaluation at a subnet's resolution)."""

    def __init__(self, net: nn.Module, size: int) -> None:
        super().__init__()
        self.net, self.size = net, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(resize_batch(x, self.size))


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(1).mean()


def _full_precision(t: torch.Tensor) -> torch.Tensor:
    # autocast logits come out in bf16; losses are computed in float32 (float64 models stay so)
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def ofa_train_step(supernet: OFAMobileNetV3, batch, teacher: nn.Module | None, phase_cfg: Phase,
                   step_seed: int) -> dict:
    """One progressive-shrinking step without the optimiser update: draw a resolution and
    ``phase_cfg.subnets_per_step`` subnets from ``random.Random(step_seed)``, and for each run a
    forward and a backward of ``CE + kd_ratio * soft-CE(teacher)`` (gradients accumulate; the
    caller zeroes them before and steps the optimiser after, averaging over processes first).

    Returns {"loss": mean loss over the subnets, "correct": mean correct count, "n": batch size,
    "resolution": r, "subnets": [the subnets drawn], "logits": the last subnet's (detached)}.
    """
    x, y = batch
    rng = random.Random(step_seed)
    r = rng.choice(phase_cfg.resolutions)
    x = resize_batch(x, r)
    amp = phase_cfg.amp and x.device.type == "cuda"
    soft = None
    if teacher is not None and phase_cfg.distill and phase_cfg.kd_ratio > 0:
        teacher.train()  # as OFA's progressive_shrinking.train_one_epoch
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            soft = F.softmax(_full_precision(teacher(x)), dim=1)
    # sums stay on the device (float64: the same sums as adding the Python floats in order); one
    # read-back per step instead of three per subnet
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.float64, device=x.device)
    subnets = []
    for _ in range(phase_cfg.subnets_per_step):
        subnets.append(supernet.sample(rng, phase_cfg.kernel_sizes, phase_cfg.expand_ratios, phase_cfg.depths))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = _full_precision(supernet(x))
        loss = F.cross_entropy(out, y, label_smoothing=phase_cfg.label_smoothing)
        if soft is not None:
            loss = loss + phase_cfg.kd_ratio * soft_cross_entropy(out, soft)
        loss.backward()
        loss_sum += loss.detach().double()
        correct += (out.detach().argmax(1) == y).sum()
    k = len(subnets)
    total, right = torch.stack([loss_sum, correct]).tolist()
    if not math.isfinite(total):
        raise FloatingPointError(f"loss became {total / k} in phase {phase_cfg.name}; lower the learning rate")
    return {"loss": total / k, "correct": right / k, "n": int(y.numel()), "resolution": r, "subnets": subnets,
            "logits": out.detach()}


def average_gradients(model: nn.Module) -> None:
    """Averages the gradients over the processes in one flat all-reduce per dtype. The supernet
    is not wrapped in DDP: every rank samples the same subnets, so the same parameters have
    gradients on every rank, which is what this relies on."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    world = dist.get_world_size()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_parameters(model: nn.Module) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, 0)


# ---------------------------------------------------------------------------------- BN and evaluation


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader, device: torch.device, resolution: int | None = None) -> int:
    """Sets every BatchNorm's running mean and variance to the average over ``loader`` of the
    batch mean and (biased) batch variance its input has when the network normalises with batch
    statistics (OFA's ``set_running_statistics``). Only the channels in use are written (sliced
    BN). Returns the number of images used."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    acc: dict[nn.Module, list] = {}

    def hook(m, inputs):
        x = inputs[0].float()
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dims)
        var = (x - mean.view(1, -1, *([1] * (x.dim() - 2)))).pow(2).mean(dims)
        n = x.shape[0]
        if m in acc:
            acc[m][0] += mean * n
            acc[m][1] += var * n
            acc[m][2] += n
        else:
            acc[m] = [mean * n, var * n, n]

    handles = [m.register_forward_pre_hook(hook) for m in bns]
    was = model.training
    seen = 0
    try:
        model.train()
        for x, _ in loader:
            x = x.to(device, non_blocking=True)
            if resolution is not None:
                x = resize_batch(x, resolution)
            model(x)
            seen += x.shape[0]
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    for m, (s_mean, s_var, n) in acc.items():
        c = s_mean.numel()
        m.running_mean[:c].copy_(s_mean / n)
        m.running_var[:c].copy_(s_var / n)
    return seen


def evaluate_subnet(supernet: OFAMobileNetV3, subnet: Mapping[str, Any], calib_loader, eval_loader,
                    device: torch.device) -> dict:
    """Activate ``subnet`` (with its resolution ``r``), recalibrate BN, evaluate: {"acc", "loss", "n"}."""
    supernet.set_active(subnet)
    r = subnet["r"]
    recalibrate_bn(supernet, calib_loader, device, r)
    return evaluate(Resized(supernet, r), eval_loader, device)


# ---------------------------------------------------------------------------------- persistence


def export_supernet(folder: str | Path, supernet: OFAMobileNetV3, space: Space, extra: dict | None = None) -> None:
    """model.safetensors + model.json (architecture as data, space, anything in ``extra``)."""
    desc = {"architecture": {"name": "ofa_mbv3", "kwargs": {"num_classes": supernet.num_classes,
                                                            "in_channels": supernet.in_channels,
                                                            "arch": supernet.arch.to_dict()}},
            "space": space.to_dict(), **(extra or {})}
    save_model_export(folder, supernet, None, desc)


def load_supernet(folder: str | Path, device: str | torch.device = "cpu") -> tuple[OFAMobileNetV3, Space, dict]:
    """The supernet a run exported (``<run>/supernet`` or the run folder itself), its space and
    description. Weights come from safetensors, the architecture from JSON."""
    from pyengine._io import read_safetensors

    folder = Path(folder)
    if (folder / "supernet" / "model.json").exists():
        folder = folder / "supernet"
    if not (folder / "model.json").exists():
        raise FileNotFoundError(f"no trained supernet in {folder} (expected model.json and model.safetensors; "
                                "run `pyengine ofa train` first)")
    desc = json.loads((folder / "model.json").read_text())
    net = ofa_mbv3(**desc["architecture"]["kwargs"])
    net.load_state_dict(read_safetensors(folder / "model.safetensors", "supernet"))
    return net.to(device), Space.from_dict(desc["space"]), desc


# ---------------------------------------------------------------------------------- the run


@dataclass
class OFATrainConfig:
    """An OFA / MOOFA training run; the CLI builds it, tests build it directly. Every field is
    declared with :func:`pyengine.methods.options.option`, whose bounds ``validate`` checks
    (bad values are refused naming the flag before anything is trained)."""

    space: str = option("ofa", "search space", choices=("ofa", "moofa"))
    width_mult: float = option(1.0, "every width times this", low=0.0, low_open=True)
    divisor: int | None = option(None, "channel rounding (default 8)", low=1)
    resolutions: tuple[int, ...] | None = option(None, "default: 128..224 (ImageNet recipes), 32..56 (quick)", low=1)
    continuous_resolution: bool = option(True, "train at every multiple of 4 in the range", flag="--no-continuous")
    dataset: str = option("digits", "the dataset")
    data_dir: str | None = option(None, "folder searched first for the dataset's files")
    download: bool = option(False, "allow downloading a missing dataset")
    preset: str = option("quick", "quick | ofa-imagenet | moofa-imagenet", choices=tuple(RECIPES))
    phases: tuple[str, ...] | None = option(None, "a subset of the phase names (default: all)")
    epochs: int | None = option(None, "every phase's epochs (no warm-up) instead of the recipe's", low=1)
    steps_per_epoch: int | None = option(None, "stop an epoch early (tests, smoke runs)", low=1)
    batch_size: int | None = option(None, "batch size per process", low=1)
    lr_scale: float = option(1.0, "multiplies every phase's learning rate", low=0.0, low_open=True)
    workers: int = option(0, "data-loader worker processes", low=0)
    val_fraction: float = option(0.1, "training images held out for validation", low=0.0, high=1.0, high_open=True)
    calib_images: int | None = option(None, "BN recalibration images (default: the preset's)", low=1)
    eval_batch_size: int = option(256, "evaluation batch size", low=1, flag="eval_batch_size")
    eval_every_epoch: bool = option(True, "largest and smallest subnet of the phase, on the validation split",
                                    flag="eval_every_epoch")
    final_eval: bool = option(True, "the report's grid of uniform subnets, on the test split", flag="final_eval")
    amp: bool = option(True, "bf16 autocast on CUDA", flag="--no-amp")
    out: str | None = option(None, "run folder")
    seed: int = option(0, "seed of data split, initialisation and subnet sampling")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    resume: bool = option(False, "continue the run in --out")
    progress: bool = option(True, "progress bars when stderr is a terminal", flag="--no-progress")

    # options that do not change what a run computes (they may differ on --resume)
    RUNTIME_ONLY = ("out", "resume", "device", "workers", "progress", "data_dir", "download")

    def validate(self) -> None:
        opts.validate(self)
        if self.resolutions is not None and not self.resolutions:
            raise OptionError(f"--resolutions must be positive integers, got {self.resolutions}")

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def identity(self) -> dict:
        """What a run computes: every option except the runtime-only ones."""
        return {k: v for k, v in self.to_json().items() if k not in self.RUNTIME_ONLY}

    def resume_differences(self, saved: Mapping[str, Any]) -> list[str]:
        """``"--flag: saved -> given"`` for every option that changes what the run computes and
        differs from ``saved`` (the config the run was started with)."""
        diffs = []
        for k, v in self.identity().items():
            if k in saved and saved[k] != v:
                flag = option_flag(k)
                name = f"{flag} ({k})" if flag.startswith("--no-") else flag  # a negating flag: name the field too
                diffs.append(f"{name}: {saved[k]!r} -> {v!r}")
        return diffs

    def out_dir(self) -> Path:
        return Path(self.out or f"runs/ofa-{self.space}-{self.dataset.replace(':', '_').replace('/', '_')}")

    def default_resolutions(self) -> tuple[int, ...]:
        if self.resolutions:
            return tuple(self.resolutions)
        return QUICK_RESOLUTIONS if self.preset == "quick" else (128, 160, 192, 224)


def option_flag(name: str) -> str:
    """The command-line flag of an ``OFATrainConfig`` field (API-only fields: the field name)."""
    f = OFATrainConfig.__dataclass_fields__[name]
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


def build_data(cfg: OFATrainConfig, distributed: bool = False):
    """The run's dataset bundle, loaders and BN-calibration loader (a fixed, seeded subset of the
    training images without augmentation), all at the largest resolution."""
    from pyengine.data import build_dataset, build_loaders

    recipe = RECIPES[cfg.preset]
    with main_rank_first(cfg.download):  # under torchrun one rank downloads, the others read its files
        bundle = build_dataset(cfg.dataset, cfg.data_dir, image_size=max(cfg.default_resolutions()), seed=cfg.seed,
                               val_fraction=cfg.val_fraction, augment=recipe.augment, download=cfg.download)
    loaders = build_loaders(bundle, cfg.batch_size or recipe.batch_size, cfg.workers, distributed=distributed,
                            seed=cfg.seed, eval_batch_size=cfg.eval_batch_size)
    plain = bundle.train.with_transform(bundle.test.transform)
    n_cal = min(len(plain), cfg.calib_images or recipe.calib_images)
    idx = torch.randperm(len(plain), generator=torch.Generator().manual_seed(cfg.seed + 7))[:n_cal].tolist()
    calib = torch.utils.data.DataLoader(torch.utils.data.Subset(plain, idx), batch_size=min(cfg.eval_batch_size, 200),
                                        shuffle=False, num_workers=cfg.workers)
    return bundle, loaders, CachedBatches(calib)


class CachedBatches:
    """The batches of a loader, read once and kept in memory: BN recalibration reads the same
    few thousand images before every subnet evaluation (OFA caches them likewise)."""

    def __init__(self, loader) -> None:
        self.loader, self.batches = loader, None

    def __iter__(self):
        if self.batches is None:
            self.batches = [(x, y) for x, y in self.loader]
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.loader)


def config_from_dict(d: Mapping[str, Any]) -> OFATrainConfig:
    known = OFATrainConfig.__dataclass_fields__
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
    return OFATrainConfig(**kw)


def _rng_state(loader) -> dict:
    gen = getattr(loader, "generator", None)
    return {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate()),
            "loader": gen.get_state() if gen is not None else torch.empty(0, dtype=torch.uint8),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0, dtype=torch.uint8)}


def _set_rng_state(st: dict, loader) -> None:
    torch.set_rng_state(st["torch"])
    s = json.loads(st["python"])
    random.setstate((s[0], tuple(s[1]), s[2]))
    gen = getattr(loader, "generator", None)
    if gen is not None and st["loader"].numel():
        gen.set_state(st["loader"])
    if torch.cuda.is_available() and st["cuda"].numel():
        torch.cuda.set_rng_state(st["cuda"])


def make_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """OFA's ``no_decay_keys="bn#bias"``: no weight decay on BatchNorm parameters and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if ".bn." in name or "bias" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def phase_lr_lambda(phase: Phase, steps_per_epoch: int) -> Callable[[int], float]:
    """Per-step factor of ``phase.lr``: linear warm-up from ``warmup_lr`` over the warm-up
    epochs, then a cosine over ``epochs`` (OFA's ``warmup_adjust_learning_rate`` and
    ``calc_learning_rate``)."""
    warm = phase.warmup_epochs * steps_per_epoch
    total = max(1, phase.epochs * steps_per_epoch)
    w_lr = phase.lr if phase.warmup_lr is None else phase.warmup_lr

    def factor(step: int) -> float:
        if step < warm:
            return (w_lr + (phase.lr - w_lr) * (step + 1) / warm) / phase.lr
        t = step - warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t / total)))

    return factor


class _ShrinkingStep(StepCallback):
    """Progressive shrinking as a step of the shared training loop: ``ofa_train_step`` runs one
    forward and backward per sampled subnet (gradients accumulate), then gradients are averaged
    over the processes before the optimiser step."""

    def __init__(self, trainer: "OFATrainer", phase: Phase, phase_index: int):
        self.trainer, self.phase, self.pi = trainer, phase, phase_index
        self.epoch = self.step = 0

    def on_epoch_start(self, epoch, total_epochs):
        self.epoch = epoch

    def on_batch_start(self, step, x, y):
        self.step = step

    def forward_backward(self, model, x, y):
        s = ofa_train_step(model, (x, y), self.trainer.teacher, self.phase,
                           step_seed(self.trainer.cfg.seed, self.pi, self.epoch, self.step))
        return torch.tensor(s["loss"], dtype=torch.float64), s["logits"]

    def after_backward(self, model):
        average_gradients(model)


class OFATrainer:
    """One OFA / MOOFA training run in its output folder; ``run()`` does or resumes it."""

    def __init__(self, cfg: OFATrainConfig, *, on_epoch: Callable[[str, int], None] | None = None, log=print):
        cfg.validate()
        self.cfg, self.log, self.on_epoch = cfg, log, on_epoch
        self.out = cfg.out_dir()

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        cfg = self.cfg
        self.dist, self.device = init_distributed(resolve_device(cfg.device))
        self.main = self.dist.is_main
        seed_everything(cfg.seed)
        self.recipe = RECIPES[cfg.preset]
        res = cfg.default_resolutions()
        self.space = get_space(cfg.space, cfg.width_mult, res, cfg.divisor)
        self.batch_size = cfg.batch_size or self.recipe.batch_size
        self.bundle, self.loaders, self.calib_loader = build_data(cfg, self.dist.enabled)
        info = self.bundle.info
        self.eval_loader = self.loaders.val if self.loaders.val is not None else self.loaders.test
        self.supernet = OFAMobileNetV3(self.space.arch, info.num_classes, info.in_channels).to(self.device)
        broadcast_parameters(self.supernet)
        lr_scale = cfg.lr_scale * (self.dist.world_size if self.recipe.lr_per_process else 1)
        self.phases = build_phases(self.space, self.recipe, epochs=cfg.epochs, lr_scale=lr_scale, names=cfg.phases,
                                   resolutions=training_resolutions(res, cfg.continuous_resolution), amp=cfg.amp)
        self.teacher: MobileNetV3Subnet | None = None

    def _optimizer(self, phase: Phase, steps: int):
        r = self.recipe
        opt = torch.optim.SGD(make_param_groups(self.supernet, r.weight_decay), lr=phase.lr, momentum=r.momentum,
                              nesterov=r.nesterov)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, phase_lr_lambda(phase, steps))

    def _steps_per_epoch(self) -> int:
        n = len(self.loaders.train)
        return min(n, self.cfg.steps_per_epoch) if self.cfg.steps_per_epoch else n

    # ------------------------------------------------------------------ persistence

    def _save(self, phase_idx: int, epoch: int, opt, sched, history: list, done: bool = False) -> None:
        if not self.main:
            return
        atomic_torch_save({
            "phase": phase_idx, "epoch": epoch, "done": done,
            "model": self.supernet.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher is not None else {},
            "teacher_layout": json.dumps(self.teacher.layout) if self.teacher is not None else "",
            "optimizer": opt.state_dict() if opt is not None else {},
            "scheduler": sched.state_dict() if sched is not None else {},
            "rng": _rng_state(self.loaders.train), "history": json.dumps(history),
            "config": json.dumps(asdict(self.cfg)),
        }, self.out / "state.pt")

    def _record(self, rec: dict) -> None:
        if self.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------ evaluation

    def phase_subnets(self, phase: Phase) -> list[dict]:
        """The subnets evaluated after each epoch: the largest and smallest of the phase's
        choices, at the largest resolution."""
        a, r = self.space.arch, max(self.space.resolutions)
        big = {"ks": max(a.kernel_sizes), "e": max(phase.expand_ratios or a.expand_ratios), "d": max(phase.depths or a.depths)}
        small = {"ks": min(phase.kernel_sizes or a.kernel_sizes), "e": min(phase.expand_ratios or a.expand_ratios),
                 "d": min(phase.depths or a.depths)}
        subs = [self.space.subnet(big, r)]
        if small != big:
            subs.append(self.space.subnet(small, r))
        return subs

    def describe(self, subnet: Mapping[str, Any]) -> dict:
        lay = subnet_layout(self.space.arch, subnet, self.supernet.in_channels, self.supernet.num_classes)
        return {"peak_memory": peak_memory_of_layout(lay, subnet["r"]).peak_elements, "macs": subnet_macs(lay, subnet["r"])}

    def _evaluate(self, subnets: list[dict], loader) -> list[dict]:
        """BN recalibration and evaluation of ``subnets``. They leave the training's random state
        alone: how much of it a loader draws depends on what was loaded before in this process
        (a resumed run loads afresh), so a forked state keeps a resumed run equal to an
        uninterrupted one."""
        rows = []
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        py_state = random.getstate()
        with torch.random.fork_rng(devices=devices):
            for sub in subnets:
                m = evaluate_subnet(self.supernet, sub, self.calib_loader, loader, self.device)
                rows.append({"subnet": sub, "acc": m["acc"], "loss": m["loss"], **self.describe(sub)})
        random.setstate(py_state)
        self.supernet.set_max()
        return rows

    # ------------------------------------------------------------------ the job

    def run(self) -> dict:
        """Does or resumes the run; the folder is locked for its whole duration (a second run
        into the same --out is refused naming the holder's pid)."""
        with locked_run_folder(self.out):
            return self._run()

    def _run(self) -> dict:
        cfg = self.cfg
        state_path = self.out / "state.pt"
        st = None
        if cfg.resume and state_path.exists():
            # options are checked before anything is built
            st = load_state(state_path, map_location="cpu")
            diffs = cfg.resume_differences(json.loads(st["config"]))
            if diffs:
                raise OptionError(f"--resume: the run in {self.out} was started with other options "
                                  f"({'; '.join(diffs)}); resume with the same options (or leave them out), "
                                  "or start a new run with another --out")
        elif state_path.exists() and not cfg.resume:
            raise FileExistsError(f"{self.out} already holds a run; pass --resume to continue it or --out for a new folder")
        self.setup()
        history: list[dict] = []
        start_phase, start_epoch = 0, 0
        if st is not None:
            self.supernet.load_state_dict(st["model"])
            if st["teacher_layout"]:
                self.teacher = _no_dropout(MobileNetV3Subnet(json.loads(st["teacher_layout"])).to(self.device))
                self.teacher.load_state_dict(st["teacher"])
            history = json.loads(st["history"])
            start_phase, start_epoch = st["phase"], st["epoch"]
            _set_rng_state(st["rng"], self.loaders.train)
            if st["done"]:
                self.log(f"{self.out} is already complete; writing the report again")
                return self._finish(history)
            if self.main:
                self.log(f"resuming {self.out}: phase {self.phases[start_phase].name if start_phase < len(self.phases) else '-'}, "
                         f"after epoch {start_epoch}")
        elif self.main:  # only the main rank touches the folder
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        if self.main:
            atomic_write_text(self.out / "config.json", json.dumps(asdict(cfg), indent=2))
        barrier()
        steps = self._steps_per_epoch()
        t_start = time.perf_counter()
        for pi in range(start_phase, len(self.phases)):
            phase = self.phases[pi]
            opt, sched = self._optimizer(phase, steps)
            first_epoch = start_epoch if pi == start_phase else 0
            if first_epoch == 0:
                if phase.reorganize_stage is not None:
                    self.supernet.reorganize_middle_channels(phase.reorganize_stage)
            elif st is not None and st["optimizer"]:
                opt.load_state_dict(st["optimizer"])
                sched.load_state_dict(st["scheduler"])
            if phase.distill and self.teacher is None:
                # progressive shrinking without a "full" phase in this run: the largest subnet
                # as it is now is the teacher
                self.teacher = _no_dropout(self.supernet.extract(self.space.max_subnet()))
            if self.main:
                self.log(f"[{phase.name}] {phase.total_epochs - first_epoch} epoch(s), {phase.subnets_per_step} subnet(s) "
                         f"per step, k {list(phase.kernel_sizes)} e {list(phase.expand_ratios)} d {list(phase.depths)}")
            step_cb = _ShrinkingStep(self, phase, pi)
            tcfg = TrainConfig(epochs=phase.total_epochs, amp=False, channels_last=False, workers=0, augment=False)

            def before_epoch(epoch, pi=pi):
                self.loaders.set_epoch(pi * 10_000 + epoch)

            def epoch_end(ep, rec, pi=pi, phase=phase, opt=opt, sched=sched):
                evals = self._evaluate(self.phase_subnets(phase), self.eval_loader) if cfg.eval_every_epoch else []
                rec = {"phase": phase.name, **{k: rec[k] for k in ("epoch", "train_loss", "train_acc", "lr", "seconds")},
                       "eval": [{"d": e["subnet"]["d"][0], "k": e["subnet"]["ks"][0], "e": e["subnet"]["e"][0],
                                 "r": e["subnet"]["r"], "acc": e["acc"]} for e in evals]}
                history.append(rec)
                self._record(rec)
                if self.main:
                    accs = ", ".join(f"k{e['k']} e{e['e']} d{e['d']} r{e['r']}: {e['acc']:.2f}%" for e in rec["eval"])
                    self.log(f"[{phase.name}] epoch {ep}/{phase.total_epochs}  loss {rec['train_loss']:.3f}  "
                             f"train acc {rec['train_acc']:.1f}%  val {accs}  ({rec['seconds']:.1f}s)")
                self._save(pi, ep, opt, sched, history)
                if self.on_epoch:
                    self.on_epoch(phase.name, ep)

            # several forwards per step (one per sampled subnet) through the loop's StepCallback
            train_epochs(self.supernet, self.loaders.train, self.device, tcfg, opt, sched, start_epoch=first_epoch,
                         hooks=EpochHooks(before_epoch=before_epoch, on_epoch_end=epoch_end), callbacks=[step_cb],
                         progress=(None if cfg.progress else False) if self.main else False, desc=phase.name,
                         max_steps=steps)
            if phase.name == "full":
                self.teacher = _no_dropout(self.supernet.extract(self.space.max_subnet()))
            self._save(pi + 1, 0, None, None, history)
            start_epoch, st = 0, None
        self.wall_seconds = time.perf_counter() - t_start
        self._save(len(self.phases), 0, None, None, history, done=True)
        return self._finish(history)

    def final_subnets(self) -> list[dict]:
        """Largest, middle and smallest uniform subnets at the smallest and largest resolution."""
        a, sp = self.space.arch, self.space
        mid = lambda v: v[len(v) // 2]  # noqa: E731
        uniform = [(max(a.kernel_sizes), max(a.expand_ratios), max(a.depths)),
                   (mid(a.kernel_sizes), mid(a.expand_ratios), mid(a.depths)),
                   (min(a.kernel_sizes), min(a.expand_ratios), min(a.depths))]
        rs = sorted({max(sp.resolutions), min(sp.resolutions)}, reverse=True)
        return [sp.uniform(k, e, d, r) for k, e, d in uniform for r in rs]

    def _finish(self, history: list[dict]) -> dict:
        rows = self._evaluate(self.final_subnets(), self.loaders.test) if self.cfg.final_eval else []
        info = self.bundle.info.to_dict()
        info.pop("noisy_indices", None)
        report = {"config": asdict(self.cfg), "space": self.space.to_dict(), "dataset": info,
                  "device": str(self.device), "world_size": self.dist.world_size,
                  "wall_seconds": getattr(self, "wall_seconds", None),
                  "phases": [asdict(p) for p in self.phases], "history": history, "final": rows}
        if self.main:
            export_supernet(self.out / "supernet", self.supernet, self.space,
                            {"dataset": {k: info[k] for k in ("name", "num_classes", "in_channels", "image_size")},
                             "train_config": asdict(self.cfg)})
            atomic_write_text(self.out / "report.json", json.dumps(report, indent=2, default=str))
            from pyengine.methods.ofa.report import format_train_table

            self.log(format_train_table(report))
        barrier()
        return report


def run_train(cfg: OFATrainConfig, **kw) -> dict:
    return OFATrainer(cfg, **kw).run()
