"""The generic runner: any registered method, one straight line through the layers.

config -> data -> model -> dense training -> rounds of {method acts (prune / edit), rewind,
retrain, evaluate, measure} -> select the result -> fold what collapsed -> report -> export.

Every finished epoch is checkpointed atomically in ``state.pt`` (read back with
``weights_only=True``) together with the structural edit history, so ``--resume`` rebuilds the
edited network from the base architecture plus the history and continues a killed run from its
last finished epoch with the same result as an uninterrupted run. A lock keeps two runs out of
one folder.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import json
import os
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from pyengine.methods import options as opts
from pyengine.methods.base import EntropySpec, Method, StepCallback, get_method, list_methods
from pyengine.methods.options import OptionError, option
from pyengine.nn.entropy import EntropyCollector, collect_counts, entropy_by_producer
from pyengine.nn.masks import MaskSet
from pyengine.train.checkpoint import STATE_KEYS, atomic_torch_save, atomic_write_text, load_state
from pyengine.train.dist import barrier, init_distributed, main_rank_first
from pyengine.train.loop import PRESETS, EpochHooks, evaluate, make_optimizer, make_scheduler, train_epochs, with_overrides

REWINDS = ("lr", "weights", "reinit", "finetune")
TRANSFORMERS = ("vit", "swin_t")
QUICK_IMAGE_SIZE = 16  # the quick preset trains on 16x16 images so a CPU demo takes minutes
# The authors' architecture settings that go with a preset: the CIFAR ResNets keep the 3x3/2
# max-pool after the stem (EGP, EASIER, DSD2); the EASIER/LaCoOT MobileNetV2 has dropout 0.2 before
# its classifier; SDD_ViT's ViT has dropout and embedding dropout 0.1.
PRESET_MODEL_OPTS = {"paper": {"resnet18": {"maxpool": True}, "resnet34": {"maxpool": True},
                               "resnet50": {"maxpool": True}, "mobilenet_v2": {"dropout": 0.2}},
                     "vit": {"vit": {"dropout": 0.1, "emb_dropout": 0.1}}}


def _check_device(v, _o):
    if v == "auto":
        return None
    try:
        d = torch.device(v)
    except (RuntimeError, ValueError):
        return f"must be cpu, cuda, cuda:N or auto, got {v!r}"
    if d.type not in ("cpu", "cuda"):
        return f"must be cpu, cuda, cuda:N or auto, got {v!r}"
    return None


def _check_method(v, _o):
    return None if v in list_methods() else f"must be one of {', '.join(list_methods())}, got {v!r}"


@dataclass
class RunConfig:
    """Everything one run needs except the method's own options (``options``).

    The CLI, config.json and this constructor all come from these declarations; the method's
    options come from its ``Options`` dataclass (pass an instance or a dict)."""

    model: str = option("resnet18", "resnet18 (CIFAR stem), resnet34/50, vgg11/13/16/19_bn, mobilenet_v2, vit, swin_t, or "
                        "tv:<torchvision name>")
    method: str = option("egp", "the method (its options are listed below)", check=_check_method)
    dataset: str = option("digits", "digits (offline, bundled with scikit-learn), fashion-mnist, cifar10, cifar100, "
                          "tiny-imagenet, imagefolder:PATH")
    data_dir: str | None = option(None, "folder searched first for the dataset's files")
    download: bool = option(False, "allow downloading a dataset that is not found")
    preset: str = option("quick", "training recipe: quick (a CPU demo: 3 epochs per round, 16x16 images), paper "
                         "(160 epochs, SGD 0.1, steps 80/120, wd 1e-4; the authors' models), swin, vit",
                         choices=tuple(sorted(PRESETS)))
    epochs: int | None = option(None, "training epochs per round (default: the preset's)", low=1)
    rounds: int | None = option(None, "rounds after dense training (default: the method's for the preset)", low=0)
    rewind: str = option("lr", "after pruning: lr = learning-rate rewinding (keep the weights, fresh full schedule; "
                         "the papers' choice); weights = back to the weights of --rewind-epoch (lottery ticket); "
                         "reinit = random re-initialisation (these two: pruning methods only); "
                         "finetune = a short fresh schedule of --finetune-epochs",
                         choices=REWINDS)
    rewind_epoch: int = option(0, "with --rewind weights: restart each round from the weights after this dense epoch "
                               "and the schedule at that epoch (the remaining epochs are trained)", low=0)
    finetune_epochs: int | None = option(None, "epochs per round with --rewind finetune (default: half the preset's)",
                                         low=1)
    noise: float = option(0.0, "symmetric label noise on the training set", low=0.0, high=1.0, high_open=True)
    val_fraction: float | None = option(None, "part of the training set held out as validation (default: the "
                                        "method's, else 0)", low=0.0, high=1.0, high_open=True)
    image_size: int | None = option(None, "resize images to this side (default: the dataset's; 16 with --preset quick)",
                                    low=1)
    batch_size: int | None = option(None, "batch size per process (default: the preset's)", low=1)
    lr: float | None = option(None, "learning rate (default: the preset's)", low=0.0, low_open=True)
    weight_decay: float | None = option(None, "weight decay (default: the preset's)", low=0.0)
    workers: int | None = option(None, "data-loader worker processes (default: the preset's)", low=0)
    entropy_batches: int | None = option(None, "batches used to measure entropy (default: the whole training set)",
                                         low=1)
    weights: str | None = option(None, "start from a local state dict: a torchvision checkpoint for tv:<name>, a "
                                 ".safetensors / .pt file, or a pyengine export folder")
    reset_head: bool = option(False, "with --weights: keep the new classifier (another number of classes) instead "
                              "of loading the checkpoint's")
    no_fold: bool = option(False, "end without the final folds: the network keeps the shape the method left it in (the "
                           "dense shape for the pruning methods; EASIER's identities and LaCoOT's removed blocks stay)")
    fold_max_mac_ratio: float = option(1.0, "merge two adjacent linear layers into one only when the merged layer "
                                       "has at most this many times their MACs (1: never more MACs; 0: no limit, "
                                       "e.g. depthwise + pointwise into one dense convolution)", low=0.0)
    out: str | None = option(None, "run folder (default: runs/<model>-<method>-<dataset>[-<hash of the changed "
                             "options>])")
    resume: bool = option(False, "continue the run in --out (or the default folder) from its last finished epoch")
    device: str = option("auto", "cpu, cuda, cuda:N or auto", check=_check_device)
    seed: int = option(0, "seed for data split, noise, initialisation and order", low=0, high=2**32 - 1)
    no_progress: bool = option(False, "no progress bars (one log line per epoch; the default when stderr is not a "
                               "terminal)")
    model_opts: dict = option(None, "architecture options for build_model (API only)", cli=False,
                              default_factory=dict)
    options: Any = option(None, "the method's options: an instance of its Options dataclass or a dict (API only)",
                          cli=False)

    # options that do not change what a run computes (they may differ on --resume)
    RUNTIME_ONLY = ("out", "resume", "device", "workers", "no_progress")

    def method_class(self) -> type[Method]:
        return get_method(self.method)

    def method_options(self):
        cls = self.method_class().Options
        if self.options is None:
            o = cls()
        elif isinstance(self.options, dict):
            o = opts.from_json(cls, self.options)
        elif isinstance(self.options, cls):
            o = self.options
        else:
            raise OptionError(f"options must be a {cls.__name__} or a dict for method {self.method}, "
                              f"got {type(self.options).__name__}")
        return o

    def validate(self) -> None:
        opts.validate(self)
        o = self.method_options()
        opts.validate(o)
        self.options = o
        if self.rewind in ("weights", "reinit") and not self.method_class().uses_rewind:
            raise OptionError(f"--rewind {self.rewind} cannot be used with --method {self.method}: its rounds go on "
                              "from the current weights (and may edit the network's structure, so earlier weights "
                              "would no longer fit); use --rewind lr or finetune")
        if self.finetune_epochs is not None and self.rewind != "finetune":
            raise OptionError("--finetune-epochs only applies with --rewind finetune")
        from pyengine.models import model_options

        takes = model_options(self.model)
        unknown = sorted(set(self.model_opts or {}) - set(takes)) if takes is not None else []
        if unknown:
            raise OptionError(f"model option(s) {unknown} do not apply to --model {self.model} (it takes {takes})")

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        d["options"] = opts.to_json(self.method_options())
        return d

    @classmethod
    def from_json(cls, data: dict) -> "RunConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise OptionError(f"unknown run option(s) {unknown}")
        return cls(**data)

    def identity(self) -> dict:
        """What a run computes: every option except the runtime-only ones."""
        d = self.to_json()
        for k in self.RUNTIME_ONLY:
            d.pop(k, None)
        return d

    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        base = f"runs/{self.model}-{self.method}-{self.dataset}".replace(":", "_")
        base = base[:5] + base[5:].replace("/", "_")
        changed = opts.non_default(self)
        for k in self.RUNTIME_ONLY + ("model", "method", "options"):
            changed.pop(k, None)
        if re.fullmatch(r"[A-Za-z0-9._-]+", self.dataset):  # named in full by the folder; a path is not
            changed.pop("dataset", None)
        preset = PRESETS.get(self.preset)
        for k in ("epochs", "batch_size", "lr", "weight_decay", "workers"):  # given, but the preset's own value
            if k in changed and preset is not None and getattr(preset, k, None) == changed[k]:
                changed.pop(k)
        mo = opts.non_default(self.method_options())
        if mo:
            changed["options"] = mo
        if not changed:
            return Path(base)
        digest = hashlib.sha256(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:8]
        return Path(f"{base}-{digest}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for, but no CUDA device is available")
    return name


def _rng_state(loaders) -> dict:
    """The random state a resumed epoch must start from: torch's global generator (augmentation,
    dropout) and the training loader's shuffling generator."""
    gen = getattr(loaders.train, "generator", None)
    return {"torch": torch.get_rng_state(),
            "loader": gen.get_state() if gen is not None else torch.empty(0, dtype=torch.uint8)}


def _set_rng_state(st: dict, loaders) -> None:
    torch.set_rng_state(st["torch"])
    gen = getattr(loaders.train, "generator", None)
    if gen is not None and st["loader"].numel():
        gen.set_state(st["loader"])


def all_layer_sparsity(model: nn.Module) -> float:
    """Fraction of zero weights over every Conv/Linear weight of the model."""
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and getattr(m, "weight", None) is not None:
            total += m.weight.numel()
            zeros += int((m.weight.detach() == 0).sum())
    return zeros / total if total else 0.0


# activations that equal the identity wherever their input is ON (z > 0) / that output exactly 0 where it is OFF
def Edit_describe(d: dict) -> str:
    from pyengine.graph import Edit

    return Edit.from_dict(d).describe()


def collapse_edits(sites, summary: dict, approximate: bool = False) -> tuple[list, list[dict]]:
    """The edits a round's collapse allows, exact on the measured data
    (:func:`pyengine.graph.edits.collapse_edit`): an activation whose every neuron was constant
    becomes the linear map it equals there - the identity (always ON: ReLU, LeakyReLU, PReLU,
    ELU, CELU, RReLU), its scale (SELU always ON; LeakyReLU / PReLU always OFF: their slope),
    the constant 0 (a ReLU / ReLU6 always OFF) or a per-channel gate (a ReLU with some neurons
    always ON and the rest always OFF: 0/1; a LeakyReLU: 1/slope). Returns (edits, refused) -
    refused lists the collapsed activations for which no such exact replacement exists (e.g. a
    GELU is not the identity where z > 0), with the reason.

    approximate: an activation of another kind whose every neuron was always ON becomes the
    identity too (NEPENTHE's linearisation of Swin-T's GELUs and MobileNetV2's ReLU6s: close to
    the identity for z > 0, not equal); its edit's args say ``approximate``."""
    from pyengine.graph.edits import collapse_edit

    out, refused = [], []
    by_name = {s.name: s for s in sites}
    sizes = {e["name"]: e["n_neurons"] for e in summary.get("entropy_sites", [])}
    for name, c in sorted(summary.get("constant_neurons", {}).items()):
        site = by_name.get(name)
        if site is None or name not in sizes:
            continue
        try:
            out.append(collapse_edit(name, site.module, c["on"], sizes[name], approximate=approximate))
        except ValueError as exc:
            refused.append({"target": name, "reason": str(exc)})
    return out, refused


RUN_STATE_FORMAT = "pyengine-run-state-2"  # the "format" of state.pt (the sdd sweep seeds such files)


class FileLock:
    """A non-blocking exclusive flock on a file holding the owner's pid (released by the OS when
    the process dies, so a killed run never leaves a stale lock)."""

    def __init__(self, path: Path):
        self.path, self.fd = Path(path), None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class RunLock(FileLock):
    """The lock of a run folder: a second run there is refused, naming the holder's pid."""

    def __init__(self, folder: Path):
        super().__init__(Path(folder) / ".lock")

    def acquire(self) -> None:
        if not self.try_acquire():
            try:
                other = self.path.read_text(errors="replace").strip()
            except OSError:
                other = ""
            raise FileExistsError(f"{self.path.parent} is in use by another run (pid {other or '?'}); wait for it to "
                                  "finish or choose another --out")


@contextlib.contextmanager
def locked_run_folder(folder: Path):
    """Creates a run folder and holds its lock while the block runs (rank 0 under torchrun: the
    other ranks of the same run share the folder); a second run there is refused."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create the run folder {folder}: {exc.strerror or exc}") from None
    lock = RunLock(folder)
    if int(os.environ.get("RANK", "0")) == 0:
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


class _TrainEntropy(StepCallback):
    """Accumulates entropy counts during the last epoch of a training run (EASIER)."""

    def __init__(self, ctx: "RunContext", spec: EntropySpec):
        self.ctx, self.spec = ctx, spec
        self.collector: EntropyCollector | None = None
        self.active = False

    def on_epoch_start(self, epoch, total_epochs):
        self.stop()
        if epoch == total_epochs - 1:
            self.collector = EntropyCollector(self.ctx.model, inclusive=self.spec.inclusive,
                                              per_position=self.spec.per_position, sites=self.ctx.sites,
                                              per_batch=self.spec.average == "batch")
            self.collector.__enter__()
            self.active = True

    def stop(self):
        if self.active and self.collector is not None:
            self.collector.__exit__(None, None, None)
        self.active = False

    def on_train_end(self, model):
        self.stop()


class RunContext:
    """What a method sees of a run: the model, its masks, the data, and the edit helpers.

    Attributes: model (the bare module; ``train_model`` is the DDP-wrapped one under torchrun),
    masks (MaskSet over the method's prunable weights), sites (activation map), device,
    loaders, train_cfg, example_input (one batch of one sample, for tracing), edits (the
    structural edit history, a list of JSON records), rounds (summaries so far), log.
    """

    def __init__(self):
        self.model: nn.Module | None = None
        self.train_model: nn.Module | None = None
        self.masks: MaskSet | None = None
        self.sites = []
        self.edits: list[dict] = []
        self.rounds: list[dict] = []
        self.example_input: torch.Tensor | None = None
        self.device = torch.device("cpu")
        self.log: Callable[[str], None] = print
        self.dist = None
        self._prunable: list[str] | str = "conv+linear"
        # exact folds of adjacent linear layers are refused when the merged layer would have more
        # than this many times the pair's MACs (None: no limit)
        self.fold_max_mac_ratio: float | None = 1.0

    # ---- structure ---------------------------------------------------------------------
    def refresh_sites(self) -> None:
        from pyengine.graph import activation_map

        self.sites = activation_map(self.model, example_input=self.example_input)

    def producer_weights(self) -> list[str]:
        """Weight names of the layers that feed an activation (EGP's prunable set)."""
        params = dict(self.model.named_parameters())
        out = []
        for s in self.sites:
            w = f"{s.producer}.weight" if s.producer else None
            if w is not None and w in params and w not in out:
                out.append(w)
        return out

    def edit(self, edits: list) -> list[dict]:
        """Apply structural edits (pyengine.graph Edit records) to the model, record them in the
        history, and rebuild the activation map, the masks and the DDP wrapper. Returns the
        applied records."""
        from pyengine.graph import Edit, apply_edit

        if not edits:
            return []
        applied = []
        masks = self.masks.state_dict() if self.masks is not None else {}
        for e in edits:
            e = e if isinstance(e, Edit) else Edit.from_dict(e)
            # completes e.args; the masks follow the edit in the same pass
            self.model = apply_edit(self.model, e, self.example_input, masks=masks)
            applied.append(e.to_dict())
        self.edits.extend(applied)
        self.model.to(self.device)
        self.refresh_sites()
        self._rebuild_masks(masks)
        self._wrap()
        return applied

    def apply_collapse(self, summary: dict) -> tuple[list[dict], list[dict]]:
        """Replaces the activations ``summary`` found collapsed (identity when always ON, their
        constant when always OFF), one edit at a time; returns (applied records, refused ones
        with the reason)."""
        edits, refused = collapse_edits(self.sites, summary, self.approximate_collapse)
        applied = []
        for e in edits:
            try:
                applied += self.edit([e])
            except (ValueError, NotImplementedError) as exc:
                refused.append({"target": e.target, "reason": str(exc)})
        return applied, refused

    @property
    def approximate_collapse(self) -> bool:
        """Whether the method linearises always-ON activations that are not exactly linear
        (NEPENTHE's ``--approximate``)."""
        return bool(getattr(getattr(getattr(self, "method", None), "opt", None), "approximate", False))

    @staticmethod
    def fold_spec(spec: EntropySpec | None) -> EntropySpec | None:
        """The statistic a fold decides its collapses on, where it differs from ``spec``: a
        statistic gathered in train mode (EASIER's, NEPENTHE's ``--entropy-when train``: BatchNorm
        batch statistics, augmented images) can call an activation always OFF that the eval-mode
        network - the one the fold keeps - turns ON, so its constant / identity edit would change
        the outputs; the fold counts on an eval-mode pass with pooled counts instead. None where
        ``spec`` already counts on the eval-mode network (or per position: DSD2)."""
        if spec is None or spec.per_position or not (spec.when == "train" or spec.train_mode):
            return None
        return dataclasses.replace(spec, when="pass", train_mode=False, average="pooled")

    @contextlib.contextmanager
    def random_state_kept(self):
        """Runs its block with torch's (CPU and this run's CUDA device) and Python's random state
        put back afterwards: an extra pass over a shuffling or augmenting loader leaves the draws
        of the training that follows (and a resumed run) unchanged."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=devices):
                yield
        finally:
            random.setstate(py_state)

    def exact_collapse_summary(self, summary: dict, spec: EntropySpec | None) -> dict:
        """The summary whose collapse edits a fold may apply exactly to the deployed (eval-mode)
        network: ``summary`` itself, or where the method counts in train mode (:meth:`fold_spec`)
        a new measurement on an eval-mode pass over the training images without augmentation."""
        loader = getattr(self, "entropy_loader", None)
        exact = self.fold_spec(spec)
        if exact is None or loader is None:
            return summary
        cfg = getattr(self, "cfg", None)
        with self.random_state_kept():
            ent, constant = self.measure(exact, loader, max_batches=cfg.entropy_batches if cfg is not None else None)
        return {**summary, "entropy_sites": [asdict(e) for e in ent.values()], "constant_neurons": constant}

    def fold_collapsed(self, summary: dict) -> dict:
        """The collapse edits of ``summary``, then every exact fold; returns a record for the report."""
        return self._fold_exact(*self.apply_collapse(summary))

    def _fold_exact(self, applied: list[dict], refused_edits: list[dict]) -> dict:
        """Every exact fold the network allows (BN, linear chains, constant branches, dead code);
        masks follow the folds."""
        from pyengine.graph import fold_network

        self.model.eval()
        masks = self.masks.state_dict() if self.masks is not None else None
        model, history, refused = fold_network(self.model, self.example_input, max_mac_ratio=self.fold_max_mac_ratio,
                                               masks=masks)
        self.model = model.to(self.device)
        folds = [h.to_dict() for h in history]
        self.edits.extend(folds)
        self.refresh_sites()
        self._rebuild_masks(masks)
        self._wrap()
        return {"collapse_edits": applied, "folds": folds, "refused": refused_edits + [dict(r) for r in refused],
                "described": [Edit_describe(e) for e in applied + folds]}

    def _rebuild_masks(self, state: dict | None = None) -> None:
        prunable = self._prunable if isinstance(self._prunable, str) else \
            [n for n in self._prunable if n in dict(self.model.named_parameters())]
        # after folding, a network may have no prunable layer left (e.g. everything was constant)
        self.masks = MaskSet(self.model, prunable, allow_empty=bool(self.edits)).to(self.device)
        if state:
            keep = {k: v for k, v in state.items() if k in self.masks.masks}
            for k, v in keep.items():
                if tuple(v.shape) == tuple(self.masks.masks[k].shape):
                    self.masks.masks[k] = v.to(device=self.device, dtype=torch.bool).clone()
            self.masks.apply()

    def _wrap(self) -> None:
        self.train_model = self.model
        if self.dist is not None and self.dist.enabled:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # ---- measurement -------------------------------------------------------------------
    def measure(self, spec: EntropySpec, loader=None, *, max_batches: int | None = None,
                collector: EntropyCollector | None = None):
        """Per-activation entropy as ``spec`` asks, over ``loader`` (or from the counts a
        ``collector`` accumulated during training), and the ON/OFF split of the neurons of every
        activation whose neurons are all constant: ({name: LayerEntropy}, {name: {"on": [...]}})."""
        if collector is not None:
            col = collector
            col.all_reduce()
        else:
            col = collect_counts(self.model, loader, self.device, inclusive=spec.inclusive, per_position=spec.per_position,
                                 train_mode=spec.train_mode, max_batches=max_batches, sites=self.sites,
                                 per_batch=spec.average == "batch")
        ent = col.results()
        unseen = [s.name for s in self.sites if s.name not in ent]
        if unseen:  # e.g. nn.TransformerEncoderLayer's fused eval path never calls its activation module
            import warnings

            warnings.warn(f"activation module(s) {unseen[:8]}{' ...' if len(unseen) > 8 else ''} never ran during the "
                          "entropy measurement: they have no entropy, and the method cannot act on them (a module "
                          "skipped by the forward, or a fused path that bypasses it)", RuntimeWarning, stacklevel=3)
        constant = {}
        if not spec.per_position:
            for name, e in ent.items():
                if e.n_always_on + e.n_always_off == e.n_neurons:
                    c = col.counts[name]
                    constant[name] = {"on": (c == col.samples[name]).nonzero().flatten().tolist()}
        return ent, constant

    def evaluate(self, split: str = "test") -> dict | None:
        loader = self.loaders[split]
        if loader is None:
            return None
        return evaluate(self.train_model, loader, self.device, self.train_cfg)


class Run(RunContext):
    """One run in its output folder; ``run()`` does (or resumes) the whole job."""

    def __init__(self, cfg: RunConfig, *, on_epoch: Callable[[int, int], None] | None = None, log=print):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.log = log
        self.on_epoch = on_epoch  # (round, epoch) after each checkpoint; tests interrupt here
        self.out = cfg.out_dir()
        self.method_cls = cfg.method_class()
        self.seq = 0  # number of metrics records written, kept in the state for resume

    # ------------------------------------------------------------------ set-up

    def _setup(self):
        cfg = self.cfg
        self.dist, self.device = init_distributed(resolve_device(cfg.device))
        self.fold_max_mac_ratio = cfg.fold_max_mac_ratio or None
        self.main = self.dist.is_main
        seed_everything(cfg.seed)
        base = PRESETS[cfg.preset]
        self.train_cfg = with_overrides(base, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                        weight_decay=cfg.weight_decay, workers=cfg.workers)
        if cfg.rewind_epoch and cfg.rewind_epoch >= self.train_cfg.epochs:
            # rewinding to the end of dense training would leave no epoch to retrain
            raise OptionError(f"--rewind-epoch {cfg.rewind_epoch} must be below the {self.train_cfg.epochs} "
                              "dense epochs")
        if cfg.rewind_epoch and cfg.rewind != "weights":
            raise OptionError("--rewind-epoch only applies with --rewind weights")
        image_size = cfg.image_size or (QUICK_IMAGE_SIZE if cfg.preset == "quick" else None)
        val_fraction = cfg.val_fraction if cfg.val_fraction is not None else getattr(self.method_cls, "default_val_fraction", 0.0)
        from pyengine.data import build_dataset, build_loaders

        with main_rank_first(cfg.download):  # under torchrun one rank downloads, the others read its files
            self.bundle = build_dataset(cfg.dataset, cfg.data_dir, image_size=image_size, noise=cfg.noise,
                                        seed=cfg.seed, val_fraction=val_fraction, augment=self.train_cfg.augment,
                                        download=cfg.download)
        info = self.bundle.info
        self.input_shape = (info.in_channels, info.image_size, info.image_size)
        self.loaders = build_loaders(self.bundle, self.train_cfg.batch_size, self.train_cfg.workers,
                                     distributed=self.dist.enabled, seed=cfg.seed)
        # entropy passes read the training images without augmentation
        plain_train = self.bundle.train.with_transform(self.bundle.test.transform)
        self.entropy_loader = build_loaders({"train": plain_train, "test": plain_train}, self.train_cfg.batch_size,
                                            self.train_cfg.workers, distributed=self.dist.enabled, seed=cfg.seed).test
        model_opts = {**PRESET_MODEL_OPTS.get(cfg.preset, {}).get(cfg.model, {}), **cfg.model_opts}
        self.arch = {"name": cfg.model, "kwargs": {"num_classes": info.num_classes, "in_channels": info.in_channels,
                                                   "image_size": info.image_size, **model_opts}}
        self.example_input = torch.zeros(1, *self.input_shape)
        self.model = self._base_model().to(self.device)
        self.example_input = self.example_input.to(self.device)
        self.refresh_sites()
        self.method = self.method_cls(self.cfg.method_options(), self)
        default = "linear" if cfg.model in TRANSFORMERS else "conv+linear"
        self._prunable = self.method.prunable(self.model) or default
        self._rebuild_masks()
        self._wrap()

    def _base_model(self) -> nn.Module:
        from pyengine.models import build_model

        model = build_model(self.cfg.model, **self.arch["kwargs"])
        if self.cfg.weights:
            from pyengine.train.checkpoint import load_weights

            load_weights(model, self.cfg.weights, reset_head=self.cfg.reset_head)
        return model

    def _rebuild_structure(self) -> None:
        """The base architecture plus the recorded edits (for --resume)."""
        from pyengine.graph import replay

        model = self._base_model()
        if self.edits:
            model = replay(model, self.edits, self.example_input.cpu())
        self.model = model.to(self.device)
        self.refresh_sites()
        self._rebuild_masks()
        self._wrap()

    def _fresh_optim(self, epochs: int, rnd: int = 0):
        tcfg = with_overrides(self.train_cfg, epochs=epochs)
        opt = make_optimizer(self.model, tcfg)
        sched = make_scheduler(opt, tcfg, len(self.loaders.train), start_epoch=self._round_start(rnd))
        return tcfg, opt, sched

    def _round_start(self, rnd: int) -> int:
        """The epoch a round's training starts at: weight rewinding to epoch k (Frankle et al. 2020,
        Renda et al. 2020) restores the weights after dense epoch k and resumes the schedule there,
        training the remaining T - k epochs; every other round starts at 0."""
        if rnd > 0 and self.cfg.rewind == "weights":
            return self.cfg.rewind_epoch
        return 0

    def _round_epochs(self, rnd: int) -> int:
        if rnd > 0 and self.cfg.rewind == "finetune":
            return self.cfg.finetune_epochs or max(1, self.train_cfg.epochs // 2)
        return self.train_cfg.epochs

    def n_rounds(self) -> int:
        if self.cfg.rounds is not None:
            return self.cfg.rounds
        own = self.method.rounds_for(self.cfg.preset)
        if own is not None:
            return own
        d = self.method_cls.default_rounds
        return d.get(self.cfg.preset, d.get("*", 1))

    # ------------------------------------------------------------------ persistence

    def _state(self, rnd, epoch, pruned, opt, sched, done=False, extra=None) -> dict:
        return {
            "format": RUN_STATE_FORMAT,
            "round": rnd, "epoch": epoch, "pruned": pruned, "done": done, "seq": self.seq,
            "model": self.model.state_dict(), "masks": self.masks.state_dict(),
            "optimizer": opt.state_dict() if opt is not None else {},
            "scheduler": sched.state_dict() if sched is not None else {},
            "rng": _rng_state(self.loaders), "rounds_json": json.dumps(self.rounds, default=str),
            "edits_json": json.dumps(self.edits), "method_json": json.dumps(self.method.state_dict()),
            "config_json": json.dumps(self.cfg.to_json(), default=str),
            "wall_seconds": self.wall_done if done else self._wall(), **(extra or {}),
        }

    def _save_state(self, rnd, epoch, pruned, opt, sched, done=False, extra=None):
        if self.main:
            atomic_torch_save(self._state(rnd, epoch, pruned, opt, sched, done, extra), self.out / "state.pt")

    def _wall(self) -> float:
        return self.wall_before + (time.perf_counter() - self.t_start)

    def _append_record(self, rec: dict) -> None:
        self.seq += 1
        if self.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"seq": self.seq, **rec}, default=str) + "\n")

    def _trim_metrics(self) -> None:
        """After a kill between a metrics line and its checkpoint: drop lines past the state."""
        path = self.out / "metrics.jsonl"
        if not path.exists() or not self.main:
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if rec.get("seq", 0) <= self.seq:
                keep.append(line)
        atomic_write_text(path, "".join(k + "\n" for k in keep))

    def _clean_folder(self, fresh: bool) -> None:
        """Remove temporary files a kill left behind; on a fresh start, also every file of an
        earlier run that never checkpointed (a rewind point, metrics, a report). Only the main
        rank touches the folder: another rank's sweep would delete the main rank's temporary file
        while it is being renamed into place."""
        if not self.main:
            return
        for tmp in self.out.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        if fresh:
            for name in ("rewind.pt", "best.pt", "metrics.jsonl", "report.json", "config.json"):
                (self.out / name).unlink(missing_ok=True)

    # ------------------------------------------------------------------ the job

    def run(self) -> dict:
        with locked_run_folder(self.out):
            return self._run()

    def _check_resume_config(self, saved: dict, state_path: Path) -> None:
        mine = self.cfg.to_json()
        diffs = []
        for k, v in mine.items():
            if k in RunConfig.RUNTIME_ONLY:
                continue
            v = json.loads(json.dumps(v, default=str))
            old = saved.get(k)
            if old == v:
                continue
            if isinstance(old, dict) and isinstance(v, dict):  # the method's options: name each one
                diffs += [f"{k}.{o}: {old.get(o)!r} -> {v.get(o)!r}" for o in sorted(set(old) | set(v))
                          if old.get(o) != v.get(o)]
            else:
                diffs.append(f"{k}: {old!r} -> {v!r}")
        if diffs:
            raise OptionError(f"--resume: the run in {self.out} was started with other options ({'; '.join(diffs)}); "
                              "resume with the same options, or start a new run with another --out")

    def _run(self) -> dict:
        cfg = self.cfg
        state_path = self.out / "state.pt"
        self.t_start, self.wall_before = time.perf_counter(), 0.0
        if cfg.resume and not state_path.exists():
            raise FileNotFoundError(f"--resume: there is no run to continue in {self.out} (no state.pt); "
                                    "start it without --resume")
        if state_path.exists() and not cfg.resume:
            raise FileExistsError(f"{self.out} already holds a run; pass --resume to continue it or --out for a new folder")
        st = None
        if cfg.resume:
            st = load_state(state_path, map_location="cpu", required=STATE_KEYS)
            self._check_resume_config(json.loads(st["config_json"]), state_path)
        self._setup()
        self._clean_folder(fresh=st is None)
        start_round, start_epoch, pruned = 0, 0, False
        opt = sched = None
        entropy_state = None
        if st is not None:
            self.edits = json.loads(st.get("edits_json", "[]"))
            if self.edits:
                self._rebuild_structure()
            self.model.load_state_dict(st["model"])
            self.masks.load_state_dict(st["masks"])
            self.rounds = json.loads(st["rounds_json"])
            self.method.load_state_dict(json.loads(st.get("method_json", "{}")))
            self.seq = int(st.get("seq", 0))
            self.wall_before = float(st.get("wall_seconds") or 0.0)
            self._trim_metrics()
            start_round, start_epoch, pruned = st["round"], st["epoch"], st["pruned"]
            entropy_state = st.get("entropy_counts")
            if st["done"]:
                self.log(f"{self.out} is already complete; writing the report again")
                self.wall_done = self.wall_before
                return self._finish()
            _, opt, sched = self._fresh_optim(self._round_epochs(start_round), start_round)
            if st["optimizer"]:
                opt.load_state_dict(st["optimizer"])
                sched.load_state_dict(st["scheduler"])
            _set_rng_state(st["rng"], self.loaders)
            if self.main:
                self.log(f"resuming {self.out}: round {start_round}, after epoch {start_epoch}")
        if self.main:
            atomic_write_text(self.out / "config.json", json.dumps(cfg.to_json(), indent=2, default=str))
            if not (self.out / "rewind.pt").exists():
                atomic_torch_save({"init": copy.deepcopy(self.model.state_dict()), "epoch": 0}, self.out / "rewind.pt")
        barrier()
        self.masks.check_ranks_agree()
        n_rounds = self.n_rounds()
        spec = self.method.entropy_spec()
        for rnd in range(start_round, n_rounds + 1):
            epochs = self._round_epochs(rnd)
            if rnd > 0 and not pruned:
                prev = self.rounds[-1]
                act = self.method.act(prev)
                if act is None:
                    self.log(f"round {rnd}: nothing left to do; stopping")
                    break
                self.masks.broadcast_()
                self.masks.check_ranks_agree()
                self._rewind()
                self.masks.apply()
                prev["next_action"] = act
                pruned = True
                _, opt, sched = self._fresh_optim(epochs, rnd)
                start_epoch = self._round_start(rnd)
                self._save_state(rnd, start_epoch, True, opt, sched)
            elif opt is None:
                _, opt, sched = self._fresh_optim(epochs, rnd)
            tcfg = with_overrides(self.train_cfg, epochs=epochs)
            callbacks = list(self.method.step_callbacks())
            train_entropy = None
            if spec is not None and spec.when == "train":
                train_entropy = _TrainEntropy(self, spec)
                callbacks.append(train_entropy)
                if entropy_state is not None and start_epoch >= epochs:
                    train_entropy.collector = EntropyCollector(self.model, inclusive=spec.inclusive,
                                                               per_position=spec.per_position, sites=self.sites,
                                                               per_batch=spec.average == "batch")
                    train_entropy.collector.load_state_dict(entropy_state, self.device)
            entropy_state = None

            def epoch_end(ep, rec, rnd=rnd, opt=opt, sched=sched, te=train_entropy):
                rec = {"round": rnd, **rec}
                if rnd == 0 and ep == self.cfg.rewind_epoch and self.main and self.cfg.rewind == "weights":
                    # lottery-ticket rewinding point: the weights after dense epoch k (k = 0: init)
                    atomic_torch_save({"init": copy.deepcopy(self.model.state_dict()), "epoch": ep}, self.out / "rewind.pt")
                self._append_record(rec)
                extra = {}
                if te is not None and te.collector is not None and ep == tcfg.epochs:
                    extra["entropy_counts"] = te.collector.state_dict()
                self._save_state(rnd, ep, rnd > 0, opt, sched, extra=extra)
                if self.on_epoch:
                    self.on_epoch(rnd, ep)

            label = "dense" if rnd == 0 else f"round {rnd}/{n_rounds}"
            if self.main:
                self.log(f"[{label}] training {epochs - start_epoch} epoch(s), sparsity {self.masks.sparsity():.2%}")
            train_epochs(self.train_model, self.loaders.train, self.device, tcfg, opt, sched, start_epoch=start_epoch,
                         masks=self.masks, hooks=EpochHooks(on_epoch_end=epoch_end), callbacks=callbacks,
                         progress=False if (cfg.no_progress or not self.main) else None, desc=label,
                         log=self.log if self.main else None)
            summary = self._summarise(rnd, spec, train_entropy)
            self.rounds.append(summary)
            self._append_record({"round_summary": rnd, **{k: v for k, v in summary.items()
                                                          if k not in ("layers", "entropy_sites", "constant_neurons")}})
            if self.main:
                self.log(f"[{label}] test acc {summary['test_acc']:.2f}%  sparsity {summary['sparsity']:.2%} "
                         f"(all layers {summary['sparsity_all_layers']:.2%})  zero-entropy activations "
                         f"{len(summary['zero_entropy'])}  emptied layers {len(summary['emptied'])}")
            self._keep_best()
            pruned, start_epoch, opt, sched = False, 0, None, None
            self._save_state(rnd + 1, 0, False, None, None)
            reason = self.method.should_stop(self.rounds)
            if reason:
                self.log(reason)
                break
        self.wall_done = self._wall()  # the run's training time, kept by every later report
        self._save_state(n_rounds + 1, 0, False, None, None, done=True)
        return self._finish()

    def _rewind(self) -> None:
        cfg = self.cfg
        if cfg.rewind not in ("weights", "reinit"):
            return
        if self.edits:
            raise OptionError(f"--rewind {cfg.rewind} cannot restore the weights of a network whose structure "
                              "was edited during the run; use --rewind lr or finetune")
        if cfg.rewind == "weights":
            init = load_state(self.out / "rewind.pt", map_location=self.device)["init"]
            self.model.load_state_dict(init)
        else:
            fresh = self._base_model().to(self.device)
            self.model.load_state_dict(fresh.state_dict())

    def _keep_best(self) -> None:
        """Snapshot the network the method selects as the result, when it is not the latest."""
        if not getattr(self.method, "keeps_best", self.method_cls.keeps_best):  # a method may decide per run
            return
        idx = self.method.select(self.rounds)
        if idx == len(self.rounds) - 1 and self.main:
            atomic_torch_save({"round": self.rounds[-1]["round"], "model": self.model.state_dict(),
                               "masks": self.masks.state_dict(), "edits_json": json.dumps(self.edits)},
                              self.out / "best.pt")

    def _summarise(self, rnd: int, spec: EntropySpec | None, train_entropy) -> dict:
        from pyengine.models import count_flops, count_params

        cfg = self.cfg
        test = self.evaluate("test")
        val = self.evaluate("val")
        ent, constant = ({}, {})
        if spec is not None:
            col = train_entropy.collector if (spec.when == "train" and train_entropy is not None) else None
            ent, constant = self.measure(spec, self.entropy_loader, max_batches=cfg.entropy_batches, collector=col)
        estimator = spec.estimator if spec is not None else "egp"
        layer_rows = []
        # a layer feeding several activations: their names, and the pooled entropy EGP uses for it
        fed: dict[str, list] = {}
        for e in ent.values():
            if e.producer:
                fed.setdefault(f"{e.producer}.weight", []).append(e)
        h_est = {f"{k}.weight": v for k, v in entropy_by_producer(ent.values(), estimator).items()}
        h_all = {f"{k}.weight": v for k, v in entropy_by_producer(ent.values(), "easier").items()}
        for r in self.masks.layer_stats():
            acts = fed.get(r["name"], [])
            layer_rows.append({"layer": r["name"], "numel": r["numel"], "kept": r["kept"], "sparsity": r["sparsity"],
                               "activation": ", ".join(e.name for e in acts) if acts else None,
                               "entropy": h_est.get(r["name"]) if acts else None,
                               "entropy_all": h_all.get(r["name"]) if acts else None,
                               "always_on": sum(e.n_always_on for e in acts) if acts else None,
                               "always_off": sum(e.n_always_off for e in acts) if acts else None,
                               "neurons": sum(e.n_neurons for e in acts) if acts else None})
        summary = {
            "round": rnd, "test_acc": test["acc"], "test_loss": test["loss"],
            "val_acc": val["acc"] if val else None, "val_loss": val["loss"] if val else None,
            "sparsity": self.masks.sparsity(), "sparsity_all_layers": all_layer_sparsity(self.model),
            "kept": self.masks.kept(), "total": self.masks.total(),
            "params_nonzero": count_params(self.model, nonzero=True),
            "macs_effective": count_flops(self.model, self.input_shape, effective=True),
            "activations": len(self.sites), "edits": len(self.edits),
            "zero_entropy": sorted(e.name for e in ent.values() if e.value(estimator) == 0.0),
            "emptied": self.masks.empty_layers(),
            "layers": layer_rows,
            "entropy_sites": [asdict(e) for e in ent.values()],
            "constant_neurons": constant,
        }
        summary.update(self.method.summary_extra(summary))
        return summary

    # ------------------------------------------------------------------ result, fold, report

    def _load_selected(self) -> int:
        """Puts the selected round's network in place; returns its index in rounds."""
        idx = self.method.select(self.rounds)
        if idx != len(self.rounds) - 1:
            snap = load_state(self.out / "best.pt", map_location="cpu")
            self.edits = json.loads(snap["edits_json"])
            self._rebuild_structure()
            self.model.load_state_dict(snap["model"])
            self.masks.load_state_dict(snap["masks"])
        return idx

    def _stats(self, model: nn.Module) -> dict:
        from pyengine.graph import measure_latency, network_stats
        from pyengine.models import count_params  # noqa: I001

        model.eval()
        st = dict(network_stats(model, self.example_input))
        st["layers"] = st.get("conv_layers", 0) + st.get("linear_layers", 0)
        st["params_nonzero"] = count_params(model, nonzero=True)
        batch = torch.randn(32, *self.input_shape, device=self.device)
        st["latency_ms_batch32"] = {self.device.type: measure_latency(model, batch, self.device)}
        if self.device.type == "cuda":
            cpu_model = copy.deepcopy(model).cpu()
            st["latency_ms_batch32"]["cpu"] = measure_latency(cpu_model, batch.cpu(), torch.device("cpu"))
        return st

    def _finish(self) -> dict:
        from pyengine.report import print_summary, write_plots

        if not self.rounds:
            raise RuntimeError("the run finished no round")
        idx = self._load_selected()
        result = self.rounds[idx]
        method_result = self.method.finish(result)
        # the dense architecture's shape, MACs and speed; its nonzero weights are the trained dense
        # network's (round 0: a fresh initialisation has zero BatchNorm biases)
        dense_model = self._base_model().to(self.device)
        networks = {"dense": self._stats(dense_model), "pruned": self._stats(self.model)}
        if self.rounds[0].get("params_nonzero") is not None:
            networks["dense"]["params_nonzero"] = self.rounds[0]["params_nonzero"]
        fold_rec = None
        if not self.cfg.no_fold:
            fold_rec = self.fold_collapsed(self.exact_collapse_summary(result, self.method.entropy_spec()))
            networks["folded"] = self._stats(self.model)
            folded_test = self.evaluate("test")
            networks["folded"]["test_acc"] = folded_test["acc"]
        final_acc = result["test_acc"]
        if isinstance(method_result, dict) and method_result.get("test_acc") is not None:
            final_acc = method_result["test_acc"]  # finish() changed the network (LaCoOT's removals)
        networks["dense"]["test_acc"] = self.rounds[0]["test_acc"]
        networks["pruned"]["test_acc"] = final_acc
        report = {
            "config": self.cfg.to_json(),
            "method": self.cfg.method,
            "train": self.train_cfg.to_dict(),
            "dataset": self.bundle.info.to_dict(),
            "device": str(self.device),
            "world_size": self.dist.world_size,
            "wall_seconds": getattr(self, "wall_done", None) or self._wall(),
            "dense_acc": self.rounds[0]["test_acc"],
            "final_acc": final_acc,
            "selected_round": result["round"],
            "final_sparsity": result["sparsity"],
            "final_sparsity_all_layers": result["sparsity_all_layers"],
            "networks": networks,
            "fold": fold_rec,
            "method_result": method_result,
            "edits": self.edits,
            "zero_entropy_layers": result["zero_entropy"],
            "emptied_layers": result["emptied"],
            "rounds": self.rounds,
        }
        if self.main:
            from pyengine.graph import export_model

            atomic_write_text(self.out / "report.json", json.dumps(report, indent=2, default=str))
            info = self.bundle.info
            export_model(self.model.cpu(), self.out / "final",
                         {"architecture": self.arch, "method": self.cfg.method, "sparsity": result["sparsity"],
                          "test_acc": final_acc,
                          "folded_test_acc": networks.get("folded", {}).get("test_acc")},
                         self.edits, self.example_input.cpu(), ("safetensors",),
                         masks=self.masks.state_dict(), image_size=info.image_size, mean=list(info.mean),
                         std=list(info.std))
            self.model.to(self.device)
            write_plots(report, self.out)
            print_summary(report, self.out, log=self.log)
        return report


def run(cfg: RunConfig, **kw) -> dict:
    """Runs (or resumes) ``cfg`` and returns its report."""
    return Run(cfg, **kw).run()
