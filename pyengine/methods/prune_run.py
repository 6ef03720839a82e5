"""`pyengine prune`: a straight line through the layers.

config -> data -> model -> dense training -> rounds of {measure entropy, prune (EGP / IMP /
one-shot magnitude), rewind, retrain, evaluate} -> report (table, JSON, plots) -> export.

Every finished epoch is checkpointed atomically (state.pt, read back with weights_only=True)
and every finished round is appended to rounds.jsonl, so ``--resume`` continues a killed run
from its last finished epoch with the same result as an uninterrupted run.
"""
from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pyengine.data import build_dataset, build_loaders
from pyengine.methods.egp import EGPConfig, egp_prune_step
from pyengine.methods.magnitude import fraction_for_target, prune_magnitude
from pyengine.models import activation_map, build_model, count_flops, count_params
from pyengine.nn.entropy import LayerEntropy, measure_entropy
from pyengine.nn.masks import MaskSet
from pyengine.train.checkpoint import atomic_torch_save, atomic_write_text, load_state, save_model_export
from pyengine.train.dist import DistInfo, barrier, init_distributed
from pyengine.train.loop import PRESETS, EpochHooks, evaluate, make_optimizer, make_scheduler, train_epochs, with_overrides

METHODS = ("egp", "imp", "magnitude")
REWINDS = ("lr", "weights", "reinit", "finetune")
TRANSFORMERS = ("vit", "swin_t")
QUICK_IMAGE_SIZE = 16  # the quick preset trains on 16x16 images so a CPU demo takes minutes


@dataclass
class PruneConfig:
    """Everything a pruning run needs; the CLI builds it, tests build it directly."""

    model: str = "resnet18"
    method: str = "egp"
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    preset: str = "quick"
    epochs: int | None = None  # per round (default: the preset's)
    rounds: int | None = None  # pruning rounds after dense training (default per method)
    sparsity: float | None = None  # target: magnitude prunes to it; imp/egp stop there
    rate: float = 0.2  # IMP: fraction of remaining weights removed per round
    zeta: float = 0.5  # EGP budget per round
    estimator: str = "egp"  # entropy estimator for EGP: egp | easier
    scope: str = "global"  # magnitude / IMP ranking
    rewind: str = "lr"  # lr | weights | reinit | finetune
    rewind_epoch: int = 0  # --rewind weights: the dense epoch whose weights rounds restart from
    finetune_epochs: int | None = None  # epochs per round with --rewind finetune
    noise: float = 0.0
    val_fraction: float = 0.0
    image_size: int | None = None  # default: the dataset's own; 16 with the quick preset
    batch_size: int | None = None
    lr: float | None = None
    workers: int | None = None
    entropy_batches: int | None = None  # limit the entropy pass (default: the whole train set)
    out: str | None = None
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    progress: bool = True
    model_opts: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.rewind not in REWINDS:
            raise ValueError(f"--rewind must be one of {', '.join(REWINDS)}, got {self.rewind!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.sparsity is not None and not 0 <= self.sparsity < 1:
            raise ValueError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.method == "magnitude" and self.sparsity is None:
            self.sparsity = 0.9
        if not 0 < self.rate < 1:
            raise ValueError(f"--rate must be in (0, 1), got {self.rate}")
        if not 0 < self.zeta <= 1:
            raise ValueError(f"--zeta must be in (0, 1], got {self.zeta}")
        if self.rounds is not None and self.rounds < 0:
            raise ValueError(f"--rounds must be >= 0, got {self.rounds}")
        if self.rewind_epoch < 0 or (self.epochs is not None and self.rewind_epoch > self.epochs):
            raise ValueError(f"--rewind-epoch must be between 0 and the dense epochs, got {self.rewind_epoch}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if not 0 <= self.noise < 1:
            raise ValueError(f"--noise must be in [0, 1), got {self.noise}")

    def n_rounds(self) -> int:
        if self.rounds is not None:
            return self.rounds
        return {"egp": 3, "imp": 5, "magnitude": 1}[self.method]

    def out_dir(self) -> Path:
        return Path(self.out or f"runs/{self.model}-{self.method}-{self.dataset.replace(':', '_').replace('/', '_')}")


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


def measure_latency(model, input_shape, device, batch: int = 32, repeats: int = 10) -> float:
    """Median forward time in ms of one batch (eval mode, no grad)."""
    import statistics

    model = model.eval()
    x = torch.randn(batch, *input_shape, device=device)
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class PruneRun:
    """One pruning run in its output folder; ``run()`` does (or resumes) the whole job."""

    def __init__(self, cfg: PruneConfig, *, on_epoch: Callable[[int, int], None] | None = None, log=print):
        cfg.validate()
        self.cfg = cfg
        self.log = log
        self.on_epoch = on_epoch  # (round, epoch) after each checkpoint; tests interrupt here
        self.out = cfg.out_dir()

    # ------------------------------------------------------------------ set-up

    def _setup(self):
        cfg = self.cfg
        self.dist, self.device = init_distributed(resolve_device(cfg.device))
        self.main = self.dist.is_main
        seed_everything(cfg.seed)
        base = PRESETS[cfg.preset]
        self.train_cfg = with_overrides(base, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, workers=cfg.workers)
        image_size = cfg.image_size or (QUICK_IMAGE_SIZE if cfg.preset == "quick" else None)
        self.bundle = build_dataset(cfg.dataset, cfg.data_dir, image_size=image_size, noise=cfg.noise, seed=cfg.seed,
                                    val_fraction=cfg.val_fraction, augment=self.train_cfg.augment, download=cfg.download)
        info = self.bundle.info
        self.input_shape = (info.in_channels, info.image_size, info.image_size)
        self.loaders = build_loaders(self.bundle, self.train_cfg.batch_size, self.train_cfg.workers,
                                     distributed=self.dist.enabled, seed=cfg.seed)
        # entropy is measured on the training images without augmentation (EGP: eval mode)
        plain_train = self.bundle.train.with_transform(self.bundle.test.transform)
        self.entropy_loader = build_loaders({"train": plain_train, "test": plain_train}, self.train_cfg.batch_size,
                                            self.train_cfg.workers, distributed=self.dist.enabled, seed=cfg.seed).test
        self.arch = {"name": cfg.model, "kwargs": {"num_classes": info.num_classes, "in_channels": info.in_channels,
                                                   "image_size": info.image_size, **cfg.model_opts}}
        self.model = build_model(cfg.model, **self.arch["kwargs"]).to(self.device)
        self.sites = activation_map(self.model)
        layers = "linear" if cfg.model in TRANSFORMERS else "conv+linear"
        self.masks = MaskSet(self.model, layers).to(self.device)
        self.ddp_model = self.model
        if self.dist.enabled:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _fresh_optim(self, epochs: int):
        tcfg = with_overrides(self.train_cfg, epochs=epochs)
        opt = make_optimizer(self.model, tcfg)
        sched = make_scheduler(opt, tcfg, len(self.loaders.train))
        return tcfg, opt, sched

    def _round_epochs(self, rnd: int) -> int:
        if rnd > 0 and self.cfg.rewind == "finetune":
            return self.cfg.finetune_epochs or max(1, self.train_cfg.epochs // 2)
        return self.train_cfg.epochs

    # ------------------------------------------------------------------ persistence

    def _save_state(self, rnd: int, epoch: int, pruned: bool, opt, sched, rounds: list, done: bool = False):
        if not self.main:
            return
        atomic_torch_save({
            "round": rnd, "epoch": epoch, "pruned": pruned, "done": done,
            "model": self.model.state_dict(), "masks": self.masks.state_dict(),
            "optimizer": opt.state_dict() if opt is not None else {},
            "scheduler": sched.state_dict() if sched is not None else {},
            "rng": _rng_state(self.loaders), "rounds_json": json.dumps(rounds),
            "config_json": json.dumps(asdict(self.cfg)),
        }, self.out / "state.pt")

    def _append_record(self, rec: dict) -> None:
        if self.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------ the job

    def run(self) -> dict:
        cfg = self.cfg
        self._setup()
        self.out.mkdir(parents=True, exist_ok=True)
        state_path = self.out / "state.pt"
        rounds: list[dict] = []
        start_round, start_epoch, pruned = 0, 0, False
        opt = sched = None
        if cfg.resume and state_path.exists():
            st = load_state(state_path, map_location=self.device)
            saved = json.loads(st["config_json"])
            for k in ("model", "method", "dataset", "seed"):
                if saved.get(k) != getattr(cfg, k):
                    raise ValueError(f"--resume: {state_path} was written with --{k} {saved.get(k)}, not {getattr(cfg, k)}")
            self.model.load_state_dict(st["model"])
            self.masks.load_state_dict(st["masks"])
            rounds = json.loads(st["rounds_json"])
            start_round, start_epoch, pruned = st["round"], st["epoch"], st["pruned"]
            if st["done"]:
                self.log(f"{self.out} is already complete; writing the report again")
                return self._finish(rounds)
            _, opt, sched = self._fresh_optim(self._round_epochs(start_round))
            if st["optimizer"]:
                opt.load_state_dict(st["optimizer"])
                sched.load_state_dict(st["scheduler"])
            _set_rng_state(st["rng"], self.loaders)
            self.log(f"resuming {self.out}: round {start_round}, after epoch {start_epoch}")
        elif state_path.exists() and not cfg.resume:
            raise FileExistsError(f"{self.out} already holds a run; pass --resume to continue it or --out for a new folder")
        else:
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        if self.main:
            atomic_write_text(self.out / "config.json", json.dumps(asdict(cfg), indent=2))
        if not (self.out / "rewind.pt").exists() and self.main:
            atomic_torch_save({"init": copy.deepcopy(self.model.state_dict())}, self.out / "rewind.pt")
        barrier()
        self.masks.check_ranks_agree()
        n_rounds = cfg.n_rounds()
        t_start = time.perf_counter()
        for rnd in range(start_round, n_rounds + 1):
            epochs = self._round_epochs(rnd)
            if rnd > 0 and not pruned:
                prune_rec = self._prune(rounds[-1])
                if prune_rec is None:
                    self.log(f"round {rnd}: nothing left to prune; stopping")
                    break
                pruned = True
                _, opt, sched = self._fresh_optim(epochs)
                start_epoch = 0
                rounds[-1]["next_prune"] = prune_rec
                self._save_state(rnd, 0, True, opt, sched, rounds)
            elif opt is None:
                _, opt, sched = self._fresh_optim(epochs)
            tcfg = with_overrides(self.train_cfg, epochs=epochs)

            def epoch_end(ep, rec, rnd=rnd):
                rec = {"round": rnd, **rec}
                if rnd == 0 and ep == cfg.rewind_epoch and self.main:
                    # lottery-ticket rewinding point: the weights after dense epoch k (k = 0: init)
                    atomic_torch_save({"init": copy.deepcopy(self.model.state_dict()), "epoch": ep}, self.out / "rewind.pt")
                self._append_record(rec)
                self._save_state(rnd, ep, rnd > 0, opt, sched, rounds)
                if self.on_epoch:
                    self.on_epoch(rnd, ep)

            label = "dense" if rnd == 0 else f"round {rnd}/{n_rounds}"
            if self.main:
                self.log(f"[{label}] training {epochs - start_epoch} epoch(s), sparsity {self.masks.sparsity():.2%}")
            train_epochs(self.ddp_model, self.loaders.train, self.device, tcfg, opt, sched, start_epoch=start_epoch,
                         masks=self.masks, hooks=EpochHooks(on_epoch_end=epoch_end),
                         progress=cfg.progress and self.main, desc=label)
            summary = self._summarise(rnd)
            rounds.append(summary)
            self._append_record({"round_summary": rnd, **{k: v for k, v in summary.items() if k not in ("layers", "entropy_sites")}})
            if self.main:
                self.log(f"[{label}] test acc {summary['test_acc']:.2f}%  sparsity {summary['sparsity']:.2%}  "
                         f"zero-entropy layers {len(summary['zero_entropy'])}  emptied {len(summary['emptied'])}")
            pruned, start_epoch, opt, sched = False, 0, None, None
            self._save_state(rnd + 1, 0, False, None, None, rounds)
            if cfg.sparsity is not None and cfg.method != "magnitude" and self.masks.sparsity() >= cfg.sparsity - 1e-9:
                self.log(f"target sparsity {cfg.sparsity:.2%} reached")
                break
        self.wall_seconds = time.perf_counter() - t_start
        self._save_state(n_rounds + 1, 0, False, None, None, rounds, done=True)
        return self._finish(rounds)

    def _prune(self, last: dict) -> dict | None:
        cfg = self.cfg
        before = self.masks.kept()
        if cfg.method == "egp":
            ent = {d["name"]: LayerEntropy(**d) for d in last["entropy_sites"]}
            rec = egp_prune_step(self.masks, ent, EGPConfig(zeta=cfg.zeta, estimator=cfg.estimator))
            removed = sum(rec["removed"].values())
            rec = {"removed_total": removed, "allocation": rec["allocation"], "emptied": rec["emptied_layers"]}
        elif cfg.method == "imp":
            frac = cfg.rate
            if cfg.sparsity is not None:
                frac = min(frac, fraction_for_target(self.masks.sparsity(), cfg.sparsity))
            removed_by = prune_magnitude(self.masks, frac, cfg.scope)
            rec = {"removed_total": sum(removed_by.values()), "fraction": frac}
        else:  # one-shot magnitude to the target sparsity
            frac = fraction_for_target(self.masks.sparsity(), cfg.sparsity)
            removed_by = prune_magnitude(self.masks, frac, cfg.scope)
            rec = {"removed_total": sum(removed_by.values()), "fraction": frac}
        if rec["removed_total"] == 0:
            return None
        self.masks.broadcast_()
        self.masks.check_ranks_agree()
        # rewinding (methods.md section 1)
        if cfg.rewind == "weights" or cfg.rewind == "reinit":
            if cfg.rewind == "weights":
                init = load_state(self.out / "rewind.pt", map_location=self.device)["init"]
                self.model.load_state_dict(init)
            else:
                fresh = build_model(cfg.model, **self.arch["kwargs"]).to(self.device)
                self.model.load_state_dict(fresh.state_dict())
        self.masks.apply()
        rec["kept_before"], rec["kept_after"] = before, self.masks.kept()
        return rec

    def _summarise(self, rnd: int) -> dict:
        cfg = self.cfg
        test = evaluate(self.ddp_model, self.loaders.test, self.device, self.train_cfg)
        val = evaluate(self.ddp_model, self.loaders.val, self.device, self.train_cfg) if self.loaders.val is not None else None
        max_b = cfg.entropy_batches
        ent = measure_entropy(self.model, self.entropy_loader, self.device, inclusive=False, max_batches=max_b)
        layer_rows = []
        stats = {r["name"]: r for r in self.masks.layer_stats()}
        by_producer = {f"{e.producer}.weight": e for e in ent.values() if e.producer}
        for name, r in stats.items():
            e = by_producer.get(name)
            layer_rows.append({"layer": name, "numel": r["numel"], "kept": r["kept"], "sparsity": r["sparsity"],
                               "activation": e.name if e else None,
                               "entropy": e.value(cfg.estimator) if e else None,
                               "entropy_all": e.mean if e else None,
                               "always_on": e.n_always_on if e else None, "always_off": e.n_always_off if e else None,
                               "neurons": e.n_neurons if e else None})
        return {
            "round": rnd, "test_acc": test["acc"], "test_loss": test["loss"],
            "val_acc": val["acc"] if val else None,
            "sparsity": self.masks.sparsity(), "kept": self.masks.kept(), "total": self.masks.total(),
            "zero_entropy": sorted(e.name for e in ent.values() if e.value(cfg.estimator) == 0.0),
            "emptied": self.masks.empty_layers(),
            "layers": layer_rows,
            "entropy_sites": [asdict(e) for e in ent.values()],
        }

    # ------------------------------------------------------------------ report

    def _finish(self, rounds: list[dict]) -> dict:
        from pyengine.report import print_summary, write_plots

        if not rounds:
            raise RuntimeError("the run finished no round")
        model = self.model
        dense_params = count_params(model)
        eff_params = count_params(model, nonzero=True)
        flops = count_flops(model, self.input_shape)
        eff_flops = count_flops(model, self.input_shape, effective=True)
        latency = measure_latency(model, self.input_shape, self.device)
        report = {
            "config": asdict(self.cfg),
            "train": self.train_cfg.to_dict(),
            "dataset": self.bundle.info.to_dict(),
            "device": str(self.device),
            "world_size": self.dist.world_size,
            "wall_seconds": getattr(self, "wall_seconds", None),
            "dense_acc": rounds[0]["test_acc"],
            "final_acc": rounds[-1]["test_acc"],
            "final_sparsity": rounds[-1]["sparsity"],
            "params": {"dense": dense_params, "effective": eff_params},
            "flops": {"dense": flops, "effective": eff_flops},
            "latency_ms_batch32": latency,
            "latency_note": "unstructured masks keep the dense layer shapes, so latency only drops once collapsed layers are folded",
            "zero_entropy_layers": rounds[-1]["zero_entropy"],
            "emptied_layers": rounds[-1]["emptied"],
            "rounds": rounds,
        }
        report["dataset"].pop("noisy_indices", None)
        if self.main:
            atomic_write_text(self.out / "report.json", json.dumps(report, indent=2, default=str))
            save_model_export(self.out / "final", model, self.masks.state_dict(),
                              {"architecture": self.arch, "sparsity": rounds[-1]["sparsity"],
                               "test_acc": rounds[-1]["test_acc"], "method": self.cfg.method})
            write_plots(report, self.out)
            print_summary(report, self.out, log=self.log)
        return report


def run_prune(cfg: PruneConfig, **kw) -> dict:
    return PruneRun(cfg, **kw).run()
