"""The sparse double descent protocol as a method: IMP on a fixed sparsity schedule with full
retraining, and the measurements the four papers plot (methods.md section 6).

* Round i (i >= 1) keeps ``round(N (1 - r)**i)`` of the N prunable weights, chosen by one global
  L1 ranking of the remaining weights (``torch.nn.utils.prune.global_unstructured`` in the
  authors' code): the sparsity is 1 - (1 - r)**i to the nearest weight, without the drift of
  rounding r * remaining every round. Run it with ``--rewind lr`` (the runner's default): the
  weights are kept and the full schedule restarts - the authors' retraining.
* After every round: test accuracy and loss (the runner), and here train accuracy and loss on the
  training images without augmentation, both against the (noisy) labels trained on and against
  the clean labels.
* ``entropy``: DSD2's per-layer entropy - ON is z > 0 at every ReLU input, a neuron is a channel x
  position, the network in eval mode, over the training images without augmentation; the layer
  value is the mean binary entropy over all its neurons.
  The authors' ``entropy.py`` averages per-batch entropies and, because it removes its hooks
  after the first batch, in fact measures the first batch only; here the ON counts are summed over
  the whole training set (or ``--entropy-batches``) before the entropy is taken, which is what
  the paper describes.
* ``kd_teacher``: DSD2's distillation - the loss of every step, dense training included, is
  ``alpha T^2 KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) CE(z_s, y)`` with the KL
  averaged over the batch (``reduction="batchmean"``) and y the noisy label, from a frozen
  teacher in eval mode (alpha 0.8, T 10 as published).
* ``human_labels``: train on human-annotated noisy labels from a file (CIFAR-10N / 100N) instead
  of synthetic noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pyengine.methods.base import EntropyAverage, EntropySpec, Method, StepCallback, register
from pyengine.methods.options import option
from pyengine.methods.prune.magnitude import IMPOptions

__all__ = ["SDD", "SDDOptions", "KDLoss", "kd_loss", "target_kept", "load_teacher"]


@dataclass
class SDDOptions(IMPOptions, EntropyAverage):
    """IMP's options (``rate``, ``scope``, ``sparsity``, declared once in magnitude.py) plus the
    measurements and remedies of the double-descent studies."""

    entropy: bool = option(False, "sdd: measure DSD2's per-layer entropy (ON = z > 0, neuron = channel x position, "
                           "eval mode, training images without augmentation) at every sparsity")
    kd_teacher: str | None = option(None, "sdd: distil from this frozen teacher (DSD2): a pyengine export or run "
                                    "folder (any architecture), or a .safetensors / .pt state dict of the model's "
                                    "own architecture", metavar="CKPT")
    kd_alpha: float = option(0.8, "sdd: weight of the distillation term (DSD2: 0.8)", low=0.0, high=1.0)
    kd_temperature: float = option(10.0, "sdd: distillation temperature T (DSD2: 10)", low=0.0, low_open=True)
    human_labels: str | None = option(None, "sdd: train on human-annotated labels read from FILE or FILE:KEY "
                                      "(CIFAR-10N/100N .pt, .npy, .npz, .json, .csv), in the official training "
                                      "order; needs --noise 0", metavar="FILE[:KEY]")
    stop_drop: float | None = option(None, "sdd: stop IMP once the validation accuracy (test accuracy without a "
                                     "validation split) falls more than this many points below the best round so "
                                     "far, and keep the last round within it - the traditional stop criterion that "
                                     "DSD2's distillation makes safe (on a double-descent curve it stops in the dip)",
                                     low=0.0)


def target_kept(total: int, rate: float, i: int) -> int:
    """Weights kept after i IMP rounds of rate r: round(total (1 - r)**i)."""
    return int(round(total * (1.0 - rate) ** i))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor, alpha: float,
            temperature: float) -> torch.Tensor:
    """DSD2's student loss: alpha T^2 KL(p_t || p_s) + (1 - alpha) CE(z_s, y), p = softmax(z / T),
    the KL summed over classes and averaged over the batch."""
    t = float(temperature)
    log_ps = F.log_softmax(student_logits / t, dim=1)
    log_pt = F.log_softmax(teacher_logits / t, dim=1)
    kl = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
    return alpha * t * t * kl + (1.0 - alpha) * F.cross_entropy(student_logits, y)


class KDLoss(StepCallback):
    """Replaces the training loss by :func:`kd_loss` against a frozen teacher (eval mode, no
    gradients: its weights and batch-norm statistics never change)."""

    def __init__(self, teacher: nn.Module, alpha: float, temperature: float):
        self.teacher = teacher
        self.alpha, self.temperature = alpha, temperature
        freeze(teacher)

    def on_train_start(self, model):
        self.teacher.eval()

    def loss(self, logits, y, x):
        self.teacher.eval()  # whoever called .train() on it, the teacher is measured in eval mode
        with torch.no_grad():
            zt = self.teacher(x).float()
        return kd_loss(logits, zt, y, self.alpha, self.temperature)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_teacher(path: str | Path, arch: dict, example_input: torch.Tensor, num_classes: int,
                 image_size: int | None = None, device="cpu") -> nn.Module:
    """A frozen teacher from ``path``: a pyengine export folder (or a run folder holding final/),
    rebuilt from its own description, so any architecture; or a .safetensors / .pt state dict
    loaded into ``arch`` (the student's architecture). Nothing from the files is executed."""
    from pyengine.models import build_model
    from pyengine.train.checkpoint import load_model_export, load_weights

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--kd-teacher {p} does not exist")
    if p.is_dir():
        folder = p / "final" if (p / "final" / "model.json").exists() else p
        if not (folder / "model.json").exists():
            raise FileNotFoundError(f"--kd-teacher {p}: a folder must be a pyengine export (model.json + "
                                    "model.safetensors) or a finished run folder holding final/")
        model, _masks, desc = load_model_export(folder)
        size = (desc.get("preprocessing") or {}).get("image_size")
        if image_size is not None and size is not None and int(size) != int(image_size):
            raise ValueError(f"--kd-teacher {p} was trained on {size}x{size} images, this run uses "
                             f"{image_size}x{image_size} (set --image-size)")
    else:
        model = build_model(arch["name"], **arch["kwargs"])
        load_weights(model, p)
    model = freeze(model.float().to(device))
    with torch.no_grad():
        out = model(example_input.to(device))
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise ValueError(f"--kd-teacher {p} outputs {tuple(out.shape[1:])} logits per image, the student "
                         f"{num_classes} classes")
    return model


@register
class SDD(Method):
    """IMP for sparse double descent studies: fixed 1-(1-r)^i schedule, train/test curves, DSD2
    entropy, distillation, human label noise."""

    name = "sdd"
    summary = "sparse double descent: IMP at 1-(1-r)^i with train/test curves, DSD2 entropy and distillation"
    Options = SDDOptions
    default_rounds = {"paper": 34, "vit": 34, "swin": 34, "*": 5}

    def __init__(self, options, run):
        super().__init__(options, run)
        self.keeps_best = options.stop_drop is not None  # an earlier round may be the result
        self._teacher: KDLoss | None = None
        self._train_loaders = None
        if options.human_labels:
            self._use_human_labels(options.human_labels)

    # ---- data ------------------------------------------------------------------------
    def _use_human_labels(self, spec: str) -> None:
        from pyengine.data.human_noise import apply_label_file, parse_label_spec, read_label_file

        cfg = getattr(self.run, "cfg", None)
        if cfg is not None and cfg.noise:
            raise ValueError("--human-labels replaces the training labels: use it with --noise 0")
        path, key = parse_label_spec(spec)
        bundle = self.run.bundle
        noisy = apply_label_file(bundle.train, read_label_file(path, key), bundle.info.num_classes)
        bundle.info.noisy_indices = noisy
        bundle.info.noise = noisy.numel() / max(1, len(bundle.train))

    def _train_eval_loaders(self):
        """The training images without augmentation, with the labels trained on and with the clean
        labels (None when they are the same)."""
        if self._train_loaders is None:
            from pyengine.data import ImageDataset, build_loaders

            run = self.run
            noisy_loader = run.entropy_loader  # training images, test transform, training labels
            clean_loader = None
            train = run.bundle.train
            if bool((train.targets != train.clean_targets).any()):
                clean = ImageDataset(train.source, train.indices, train.clean_targets, run.bundle.test.transform)
                clean_loader = build_loaders({"train": clean, "test": clean}, run.train_cfg.batch_size,
                                             run.train_cfg.workers, distributed=run.dist.enabled,
                                             seed=run.cfg.seed).test
            self._train_loaders = (noisy_loader, clean_loader)
        return self._train_loaders

    # ---- the method ------------------------------------------------------------------
    def entropy_spec(self):
        if not self.opt.entropy:
            return None
        return EntropySpec(estimator="easier", inclusive=False, per_position=True, when="pass",
                           average=self.opt.entropy_average)

    def step_callbacks(self):
        if not self.opt.kd_teacher:
            return []
        if self._teacher is None:
            run = self.run
            info = run.bundle.info
            # Building the teacher initialises a model at random before its weights are loaded: that
            # must not draw from the run's random state, which a resumed run restores before it gets
            # here (an uninterrupted one had drawn it at its dense training): so, a forked state
            with torch.random.fork_rng(devices=[]):
                teacher = load_teacher(self.opt.kd_teacher, run.arch, run.example_input, info.num_classes,
                                       info.image_size, run.device)
            self._teacher = KDLoss(teacher, self.opt.kd_alpha, self.opt.kd_temperature)
        return [self._teacher]

    def act(self, summary):
        masks = self.run.masks
        i = int(summary["round"]) + 1  # the round about to be trained
        r = self.opt.rate
        if self.opt.scope == "global":
            goal = target_kept(masks.total(), r, i)
            if self.opt.sparsity is not None:
                goal = max(goal, int(math.ceil(masks.total() * (1.0 - self.opt.sparsity) - 1e-9)))
            count = masks.kept() - goal
            if count <= 0:
                return None
            removed = masks.prune_global(count)
        else:
            removed = {}
            for n, m in masks.masks.items():
                goal = target_kept(m.numel(), r, i)
                if self.opt.sparsity is not None:
                    goal = max(goal, int(math.ceil(m.numel() * (1.0 - self.opt.sparsity) - 1e-9)))
                removed[n] = masks.prune(n, int(m.sum()) - goal)
        total = sum(removed.values())
        if total == 0:
            return None
        return {"removed_total": total, "target_sparsity": 1.0 - (1.0 - r) ** i}

    def _first_drop(self, rounds) -> tuple[int | None, list]:
        """With --stop-drop: the first round whose accuracy fell more than the drop below the best
        round before it (None: none did, or nothing to judge by), and the accuracies."""
        from pyengine.methods.depth.common import selection_acc

        accs = [selection_acc(r) for r in rounds]
        if self.opt.stop_drop is None or None in accs:
            return None, accs
        for i in range(1, len(accs)):
            if accs[i] < max(accs[:i]) - self.opt.stop_drop - 1e-9:
                return i, accs
        return None, accs

    def should_stop(self, rounds):
        reason = self.opt.reached(self.run.masks)
        if reason:
            return reason
        i, accs = self._first_drop(rounds)
        if i is None or i != len(rounds) - 1:
            return None
        split = "validation" if rounds[-1].get("val_acc") is not None else "test (no validation split)"
        return (f"{split} accuracy {accs[-1]:.2f}% fell more than {self.opt.stop_drop:g} points below the best "
                f"round's {max(accs[:-1]):.2f}%: stopping (--stop-drop)")

    def select(self, rounds):
        """With --stop-drop: the last round before the one that fell below the best; else the last."""
        i, _ = self._first_drop(rounds)
        return len(rounds) - 1 if i is None else i - 1

    def summary_extra(self, summary):
        from pyengine.train.loop import evaluate

        run = self.run
        noisy_loader, clean_loader = self._train_eval_loaders()
        tr = evaluate(run.train_model, noisy_loader, run.device, run.train_cfg)
        cl = evaluate(run.train_model, clean_loader, run.device, run.train_cfg) if clean_loader is not None else tr
        out = {"train_acc": tr["acc"], "train_loss": tr["loss"], "train_clean_acc": cl["acc"],
               "train_clean_loss": cl["loss"], "target_sparsity": 1.0 - (1.0 - self.opt.rate) ** int(summary["round"]),
               "label_noise": run.bundle.info.noise}
        sites = summary.get("entropy_sites") or []
        if sites:
            layer = {e["name"]: e["mean"] for e in sites}
            out["entropy"] = layer
            out["entropy_mean"] = sum(layer.values()) / len(layer)
            n = sum(e["n_neurons"] for e in sites)
            out["entropy_mean_neurons"] = sum(e["mean"] * e["n_neurons"] for e in sites) / max(1, n)
        return out
