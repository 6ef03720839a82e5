"""Memory-bounded architecture search on a trained supernet.

1. ``collect_accuracy_data``: sample subnets (with resolutions) from the space, measure each
   one's accuracy on held-out data after BN recalibration; optionally balanced over peak-memory
   bins (MOOFA's ``create_moofa_predictor_dataset.py``: random sampling over-represents large
   networks). One JSON line per subnet, so a killed collection resumes where it stopped.
2. ``AccuracyPredictor``: an MLP (3 hidden layers of 400, ReLU) on the one-hot encoding of
   resolution, and kernel size and expand ratio of every active block slot (OFA's
   ``MobileNetArchEncoder`` / ``AccuracyPredictor``), trained with MSE on centred accuracies,
   Adam, ReduceLROnPlateau, an 80/20 split (MOOFA's ``train_moofa_predictor.py``; learning rate
   1e-3 instead of their 3e-2, see ``train_predictor``).
3. ``evolution_search``: OFA's ``EvolutionFinder`` - a population of valid subnets, the best
   quarter kept as parents, half the children by mutation (each block with probability 0.1,
   the resolution with 0.5), half by crossover - maximising predicted accuracy under a
   peak-memory budget and optionally a MACs and a latency budget.
"""
from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from pyengine.models.ofa_mbv3 import active_slots, canonical_subnet, subnet_layout

from pyengine.methods.ofa.memory import peak_memory_of_layout, subnet_macs
from pyengine.methods.ofa.spaces import Space

__all__ = ["ArchEncoder", "AccuracyPredictor", "train_predictor", "collect_accuracy_data", "Efficiency",
           "EvolutionConfig", "evolution_search", "LatencyTable", "subnet_key", "SearchConfig", "run_search",
           "extract_subnet", "load_extracted", "RunContext"]


def subnet_key(subnet: Mapping[str, Any]) -> str:
    return json.dumps({k: subnet[k] for k in ("ks", "e", "d", "r")}, sort_keys=True)


class ArchEncoder:
    """One-hot features: resolution, then per block slot its kernel size and expand ratio
    (all zero for slots beyond the stage's depth, so depth is encoded too)."""

    def __init__(self, space: Space) -> None:
        self.space = space
        a = space.arch
        self.res = list(space.resolutions)
        self.ks, self.es = list(a.kernel_sizes), list(a.expand_ratios)
        self.n_dim = len(self.res) + a.n_slots * (len(self.ks) + len(self.es))

    def encode(self, subnet: Mapping[str, Any]) -> torch.Tensor:
        a = self.space.arch
        f = torch.zeros(self.n_dim)
        f[self.res.index(subnet["r"])] = 1
        base, width = len(self.res), len(self.ks) + len(self.es)
        for slot in active_slots(a, subnet):
            off = base + slot * width
            f[off + self.ks.index(subnet["ks"][slot])] = 1
            f[off + len(self.ks) + self.es.index(subnet["e"][slot])] = 1
        return f

    def encode_many(self, subnets: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        return torch.stack([self.encode(s) for s in subnets]) if subnets else torch.zeros(0, self.n_dim)


class AccuracyPredictor(nn.Module):
    """MLP: n_dim -> hidden (ReLU) x n_layers -> 1, plus a constant ``base_acc`` (the mean
    accuracy of the training data)."""

    def __init__(self, n_dim: int, hidden: int = 400, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers += [nn.Linear(n_dim if i == 0 else hidden, hidden), nn.ReLU()]
        layers.append(nn.Linear(hidden, 1, bias=False))
        self.layers = nn.Sequential(*layers)
        self.register_buffer("base_acc", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1) + self.base_acc


def train_predictor(features: torch.Tensor, accs: torch.Tensor, *, epochs: int = 50, lr: float = 1e-3,
                    batch_size: int = 32, hidden: int = 400, n_layers: int = 3, val_fraction: float = 0.2,
                    seed: int = 0) -> tuple[AccuracyPredictor, dict]:
    """Fits the predictor; returns it (base_acc = mean accuracy) and validation metrics
    {"val_rmse", "val_corr", "train_rmse", "n_train", "n_val"} on the held-out fraction.

    The learning rate is 1e-3 (ours): MOOFA's script uses Adam at 3e-2, which on a few hundred
    subnets collapsed the MLP to a constant (dead ReLUs) in our runs; pass ``lr=3e-2`` for theirs.
    """
    if features.shape[0] != accs.shape[0] or features.shape[0] < 4:
        raise ValueError(f"need at least 4 (feature, accuracy) pairs of equal count, got {features.shape[0]} and {accs.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(features.shape[0], generator=g)
    n_val = max(1, int(round(val_fraction * features.shape[0])))
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    mean = float(accs[tr_idx].mean())
    x_tr, y_tr = features[tr_idx].float(), accs[tr_idx].float() - mean
    x_va, y_va = features[val_idx].float(), accs[val_idx].float() - mean
    torch.manual_seed(seed)
    model = AccuracyPredictor(features.shape[1], hidden, n_layers)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=5)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(x_tr.shape[0], generator=g)
        for i in range(0, x_tr.shape[0], batch_size):
            b = order[i:i + batch_size]
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x_tr[b]), y_tr[b])
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            sched.step(float(nn.functional.mse_loss(model(x_va), y_va)))
    model.base_acc.fill_(mean)
    model.eval()
    with torch.no_grad():
        p_va, p_tr = model(x_va), model(x_tr)
    y_va, y_tr = y_va + mean, y_tr + mean
    corr = float(torch.corrcoef(torch.stack([p_va, y_va]))[0, 1]) if n_val > 1 and y_va.std() > 0 and p_va.std() > 0 else float("nan")
    return model, {"val_rmse": float((p_va - y_va).pow(2).mean().sqrt()), "val_corr": corr,
                   "train_rmse": float((p_tr - y_tr).pow(2).mean().sqrt()), "n_train": int(tr_idx.numel()),
                   "n_val": int(n_val)}


# ---------------------------------------------------------------------------------- efficiency


class LatencyTable:
    """Latency of a subnet as the sum of its layers' measured latencies (OFA's latency lookup
    table idea): every distinct block shape is timed once on ``device`` (batch 1, eval mode,
    median of ``repeats``) and cached. An estimate, not a measurement of the whole network."""

    def __init__(self, space: Space, in_channels: int, num_classes: int, device="cpu", repeats: int = 10) -> None:
        self.space, self.in_channels, self.num_classes = space, in_channels, num_classes
        self.device, self.repeats = torch.device(device), repeats
        self.cache: dict[str, float] = {}

    def _time(self, module: nn.Module, shape: tuple[int, ...]) -> float:
        import statistics

        module = module.to(self.device).eval()
        x = torch.randn(1, *shape, device=self.device)
        times = []
        with torch.no_grad():
            for i in range(self.repeats + 2):
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                module(x)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= 2:
                    times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def _cached(self, key: str, build: Callable[[], tuple[nn.Module, tuple]]) -> float:
        if key not in self.cache:
            module, shape = build()
            self.cache[key] = self._time(module, shape)
        return self.cache[key]

    def __call__(self, subnet: Mapping[str, Any]) -> float:
        from pyengine.models.ofa_mbv3 import MBConvBlock, _Head, _stem

        lay = subnet_layout(self.space.arch, subnet, self.in_channels, self.num_classes)
        side = subnet["r"]
        ms = self._cached(f"stem{self.in_channels},{lay['first_conv']},{side}",
                          lambda: (_stem(self.in_channels, lay["first_conv"], 0.1, 1e-5), (self.in_channels, side, side)))
        side = (side - 1) // 2 + 1
        for b in lay["blocks"]:
            spec = {k: b[k] for k in ("in", "mid", "out", "kernel", "stride", "act", "expand", "se_mid", "shortcut")}
            ms += self._cached(json.dumps(spec, sort_keys=True) + f"@{side}",
                               lambda spec=spec, side=side: (MBConvBlock(spec), (spec["in"], side, side)))
            side = (side - 1) // b["stride"] + 1
        c = lay["blocks"][-1]["out"]
        ms += self._cached(f"head{c},{lay['final_expand']},{lay['last_channel']},{side}",
                           lambda: (_Head(c, lay["final_expand"], lay["last_channel"], self.num_classes, 0.0, 0.1, 1e-5),
                                    (c, side, side)))
        return ms


@dataclass
class Efficiency:
    """The costs a search constrains: peak memory (elements), MACs, optional latency (ms)."""

    space: Space
    in_channels: int
    num_classes: int
    latency: LatencyTable | None = None

    def __call__(self, subnet: Mapping[str, Any]) -> dict:
        lay = subnet_layout(self.space.arch, subnet, self.in_channels, self.num_classes)
        out = {"peak_memory": peak_memory_of_layout(lay, subnet["r"]).peak_elements, "macs": subnet_macs(lay, subnet["r"])}
        if self.latency is not None:
            out["latency_ms"] = self.latency(subnet)
        return out


def within(costs: Mapping[str, float], budgets: Mapping[str, float | None]) -> bool:
    return all(b is None or costs[k] <= b for k, b in budgets.items())


# ---------------------------------------------------------------------------------- data


def collect_accuracy_data(space: Space, measure: Callable[[dict], float], efficiency: Efficiency, n: int,
                          path: str | Path | None = None, *, seed: int = 0, memory_bins: int = 0,
                          memory_range: tuple[float, float] | None = None, max_tries: int | None = None,
                          progress: bool = False, log=None) -> list[dict]:
    """``n`` records {"subnet", "acc", "peak_memory", "macs"}: random subnets from ``space``
    measured with ``measure(subnet) -> accuracy``. With ``memory_bins`` > 0, the peak-memory
    range (default: smallest to largest subnet) is cut into equal bins that each receive
    n / bins subnets (MOOFA's balanced dataset); after ``max_tries`` draws (default 50 n + 1000)
    it stops with what it has. With ``path`` every record is appended as a JSON
    line, and records already there are reused (resume)."""
    from tqdm.auto import tqdm

    path = Path(path) if path else None
    cached: dict[str, dict] = {}
    if path is not None and path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                cached[subnet_key(rec["subnet"])] = rec
    rng = random.Random(seed)
    bin_of, per_bin = (lambda m: 0), n
    if memory_bins > 0:
        lo, hi = memory_range or (efficiency(space.min_subnet())["peak_memory"], efficiency(space.max_subnet())["peak_memory"])
        width = (hi - lo) / memory_bins or 1.0
        bin_of = lambda m: min(memory_bins - 1, int((m - lo) // width)) if lo <= m <= hi else None  # noqa: E731
        per_bin = math.ceil(n / memory_bins)
    # The draws are replayed from the start on a resume; subnets already measured (in ``path``)
    # are reused, so the records equal an uninterrupted collection's.
    max_tries = max_tries or 50 * n + 1000
    records: list[dict] = []
    counts: dict[int, int] = {}
    seen: set[str] = set()
    bar = tqdm(total=n, desc="accuracy data", leave=False, disable=not progress)
    tries = 0
    while len(records) < n:
        tries += 1
        if tries > max_tries:
            if log:
                log(f"accuracy data: stopped after {max_tries} draws with {len(records)} of {n} subnets "
                    "(some memory bins are hard to reach)")
            break
        sub = space.random_subnet(rng)
        key = subnet_key(sub)
        if key in seen:
            continue
        cost = efficiency(sub)
        b = bin_of(cost["peak_memory"])
        if b is None or counts.get(b, 0) >= per_bin:
            continue
        seen.add(key)
        counts[b] = counts.get(b, 0) + 1
        rec = cached.get(key)
        if rec is None:
            rec = {"subnet": sub, "acc": float(measure(sub)), **cost}
            if path is not None:
                with open(path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
        records.append(rec)
        bar.update(1)
    bar.close()
    return records


# ---------------------------------------------------------------------------------- evolution


@dataclass
class EvolutionConfig:
    """OFA's ``EvolutionFinder`` defaults."""

    population: int = 100
    generations: int = 500  # OFA's max_time_budget
    parent_ratio: float = 0.25
    mutation_ratio: float = 0.5
    arch_mutate_prob: float = 0.1
    resolution_mutate_prob: float = 0.5
    max_tries: int = 200  # draws per valid child before falling back (ours; OFA loops forever)


def _mutate(space: Space, sub: dict, rng: random.Random, cfg: EvolutionConfig) -> dict:
    a = space.arch
    new = copy.deepcopy(sub)
    if rng.random() < cfg.resolution_mutate_prob:
        new["r"] = rng.choice(space.resolutions)
    for i in range(a.n_slots):
        if rng.random() < cfg.arch_mutate_prob:
            new["ks"][i] = rng.choice(a.kernel_sizes)
            new["e"][i] = rng.choice(a.expand_ratios)
    for i in range(a.n_stages):
        if rng.random() < cfg.arch_mutate_prob:
            new["d"][i] = rng.choice(a.depths)
    return new


def _crossover(a: dict, b: dict, rng: random.Random) -> dict:
    new = copy.deepcopy(a)
    for k in ("ks", "e", "d"):
        new[k] = [rng.choice(pair) for pair in zip(a[k], b[k])]
    new["r"] = rng.choice([a["r"], b["r"]])
    return new


def evolution_search(space: Space, predict: Callable[[list[dict]], torch.Tensor], efficiency: Efficiency,
                     budgets: Mapping[str, float | None], cfg: EvolutionConfig | None = None, *, seed: int = 0,
                     progress: bool = False) -> dict:
    """Maximise ``predict`` (a batch of subnets -> predicted accuracies) under ``budgets``
    ({"peak_memory": elements, "macs": ..., "latency_ms": ...}; None = unconstrained).

    Returns {"subnet", "predicted_acc", **costs, "history": best predicted accuracy per
    generation}. Raises ValueError when even the smallest subnet exceeds a budget.
    """
    from tqdm.auto import tqdm

    cfg = cfg or EvolutionConfig()
    if cfg.population < 2 or cfg.generations < 1:
        raise ValueError("population must be >= 2 and generations >= 1")
    rng = random.Random(seed)
    smallest = space.min_subnet()
    small_cost = efficiency(smallest)
    if not within(small_cost, budgets):
        over = {k: small_cost[k] for k, b in budgets.items() if b is not None and small_cost[k] > b}
        raise ValueError(f"budget {dict(budgets)} is below the smallest subnet of the {space.name} space ({over}); "
                         "raise the budget")

    def canon(s):
        out = canonical_subnet(space.arch, s)
        out["r"] = s["r"]
        return out

    def valid(make: Callable[[], dict]) -> tuple[dict, dict] | None:
        for _ in range(cfg.max_tries):
            s = canon(make())
            c = efficiency(s)
            if within(c, budgets):
                return s, c
        return None

    # initial population: random valid subnets; under tight budgets where random draws rarely
    # fit, mutations of the smallest subnet (ours: OFA's sampler would loop forever)
    population: list[tuple[float, dict, dict]] = []
    children, costs = [], []
    for _ in range(cfg.population):
        got = valid(lambda: space.random_subnet(rng)) or valid(lambda: _mutate(space, smallest, rng, cfg)) \
            or (smallest, small_cost)
        children.append(got[0])
        costs.append(got[1])
    n_mut = int(round(cfg.mutation_ratio * cfg.population))
    n_par = max(1, int(round(cfg.parent_ratio * cfg.population)))
    history = []
    best = None
    bar = tqdm(total=cfg.generations, desc=f"evolution {space.name}", leave=False, disable=not progress)
    for gen in range(cfg.generations + 1):
        accs = predict(children).detach().cpu().tolist()
        population += [(float(a), s, c) for a, s, c in zip(accs, children, costs)]
        population.sort(key=lambda t: -t[0])
        parents = population[:n_par]
        if best is None or parents[0][0] > best[0]:
            best = parents[0]
        history.append(best[0])
        if gen == cfg.generations:
            break
        population = parents
        children, costs = [], []
        for _ in range(n_mut):
            p = parents[rng.randrange(n_par)][1]
            s, c = valid(lambda p=p: _mutate(space, p, rng, cfg)) or (p, efficiency(p))
            children.append(s)
            costs.append(c)
        for _ in range(cfg.population - n_mut):
            p1, p2 = parents[rng.randrange(n_par)][1], parents[rng.randrange(n_par)][1]
            s, c = valid(lambda p1=p1, p2=p2: _crossover(p1, p2, rng)) or (p1, efficiency(p1))
            children.append(s)
            costs.append(c)
        bar.update(1)
        bar.set_postfix(acc=f"{best[0]:.2f}")
    bar.close()
    return {"subnet": best[1], "predicted_acc": best[0], **best[2], "history": history}


# ---------------------------------------------------------------------------------- the command


@dataclass
class SearchConfig:
    """``pyengine ofa search``: one or more trained runs, searched at every budget."""

    runs: tuple[str, ...]
    budgets: tuple[int, ...]  # peak memory, elements
    macs_budget: float | None = None
    latency_budget_ms: float | None = None
    samples: int = 2000  # subnets measured to train the predictor (OFA / MOOFA: ~2000)
    memory_bins: int = 0  # > 0: MOOFA's memory-balanced predictor data
    predictor_epochs: int = 50
    predictor_lr: float = 1e-3  # MOOFA's script: 3e-2 (see train_predictor)
    population: int = 100
    generations: int = 500
    out: str | None = None
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def validate(self) -> None:
        if not self.runs:
            raise ValueError("--run: give at least one trained run folder")
        if not self.budgets or min(self.budgets) <= 0:
            raise ValueError(f"--budgets must be positive peak-memory limits in elements, got {list(self.budgets)}")
        if self.samples < 8:
            raise ValueError(f"--samples must be >= 8, got {self.samples}")
        for name in ("macs_budget", "latency_budget_ms"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v}")
        if not (math.isfinite(self.predictor_lr) and self.predictor_lr > 0):
            raise ValueError(f"--predictor-lr must be a finite number > 0, got {self.predictor_lr}")
        for name, low in (("memory_bins", 0), ("predictor_epochs", 1), ("population", 2), ("generations", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.runs[0]) / "search"


class RunContext:
    """A trained run reopened for measurement: supernet, space, data, calibration."""

    def __init__(self, run: str | Path, device: torch.device, log=print) -> None:
        from pyengine.methods.ofa.train import build_data, config_from_dict, load_supernet

        self.run = Path(run)
        self.supernet, self.space, self.desc = load_supernet(self.run, device)
        self.device = device
        self.train_cfg = config_from_dict(self.desc.get("train_config", {}))
        self.bundle, self.loaders, self.calib_loader = build_data(self.train_cfg)
        info = self.bundle.info
        if info.num_classes != self.supernet.num_classes or info.in_channels != self.supernet.in_channels:
            raise ValueError(f"{self.run}: the data ({info.num_classes} classes, {info.in_channels} channels) does not "
                             f"match the supernet ({self.supernet.num_classes}, {self.supernet.in_channels})")
        self.val_loader = self.loaders.val if self.loaders.val is not None else self.loaders.test
        self.holdout = "val" if self.loaders.val is not None else "test"
        if self.holdout == "test":
            log(f"{self.run}: no validation split (val_fraction 0); the predictor is trained on test accuracies")

    def accuracy(self, subnet: Mapping[str, Any], split: str = "val") -> float:
        from pyengine.methods.ofa.train import evaluate_subnet

        loader = self.val_loader if split == "val" else self.loaders.test
        return evaluate_subnet(self.supernet, subnet, self.calib_loader, loader, self.device)["acc"]

    def efficiency(self, latency: bool = False) -> Efficiency:
        lat = LatencyTable(self.space, self.supernet.in_channels, self.supernet.num_classes, self.device) if latency else None
        return Efficiency(self.space, self.supernet.in_channels, self.supernet.num_classes, lat)


def _over_budget(space: Space, efficiency: Efficiency, budgets: Mapping[str, float | None]) -> dict:
    """The costs of the space's smallest subnet that exceed ``budgets`` (empty: a subnet fits)."""
    cost = efficiency(space.min_subnet())
    return {k: cost[k] for k, b in budgets.items() if b is not None and cost[k] > b}


def _costs(costs: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v:.3g}" for k, v in costs.items())


def _budgets(cfg: SearchConfig, budget: int) -> dict:
    b = {"peak_memory": budget, "macs": cfg.macs_budget, "latency_ms": cfg.latency_budget_ms}
    if cfg.latency_budget_ms is None:
        b.pop("latency_ms")
    return b


def run_search(cfg: SearchConfig, log=print) -> dict:
    """Searches every run at every budget and writes search.json / .md / .png. A (run, budget)
    that not even the smallest subnet meets is reported as "none fits"; when that holds for
    every run and budget, nothing is measured and ValueError says what the smallest subnets need."""
    from pyengine.methods.ofa.report import format_search_table, write_search_report
    from pyengine.methods.ofa.train import resolve_device, seed_everything
    from pyengine.train.loop import progress_enabled

    cfg.validate()
    device = torch.device(resolve_device(cfg.device))
    progress = progress_enabled(None if cfg.progress else False)  # bars only on a terminal
    out = cfg.out_dir()
    contexts = []
    for run in cfg.runs:  # every run opened (and every budget checked) before anything is measured
        ctx = RunContext(run, device, log)
        eff = ctx.efficiency(latency=cfg.latency_budget_ms is not None)
        over = {b: _over_budget(ctx.space, eff, _budgets(cfg, b)) for b in cfg.budgets}
        contexts.append((run, ctx, eff, over))
    if all(o for *_, over in contexts for o in over.values()):
        kinds = _budgets(cfg, cfg.budgets[0])
        smallest = "; ".join(f"{ctx.space.name} ({run}) needs "
                             + _costs({k: v for k, v in eff(ctx.space.min_subnet()).items() if k in kinds})
                             for run, ctx, eff, _ in contexts)
        raise ValueError(f"--budgets: no subnet fits any budget (the smallest subnet of {smallest}); "
                         "raise --budgets (or --macs-budget / --latency-budget-ms)")
    out.mkdir(parents=True, exist_ok=True)
    results, data, predictors, unmet = [], {}, {}, []
    names = []
    t0 = time.perf_counter()
    for run, ctx, eff, over in contexts:
        seed_everything(cfg.seed)
        name = ctx.space.name
        if name in data:
            name = f"{name}:{Path(run).name}"
        names.append(name)
        log(f"[{name}] measuring {cfg.samples} subnets for the accuracy predictor ({ctx.holdout} split)")
        records = collect_accuracy_data(ctx.space, ctx.accuracy, eff, cfg.samples,
                                        out / f"accuracy_data_{name.replace(':', '_')}.jsonl", seed=cfg.seed,
                                        memory_bins=cfg.memory_bins, progress=progress, log=log)
        data[name] = records
        enc = ArchEncoder(ctx.space)
        feats = enc.encode_many([r["subnet"] for r in records])
        accs = torch.tensor([r["acc"] for r in records])
        pred, pstats = train_predictor(feats, accs, epochs=cfg.predictor_epochs, lr=cfg.predictor_lr, seed=cfg.seed)
        predictors[name] = pstats
        log(f"[{name}] predictor: validation RMSE {pstats['val_rmse']:.2f} points, correlation {pstats['val_corr']:.3f}")

        def predict(subs, pred=pred, enc=enc):
            with torch.no_grad():
                return pred(enc.encode_many(subs))

        for budget in cfg.budgets:
            budgets = _budgets(cfg, budget)
            if over[budget]:
                log(f"[{name}] budget {budget:,}: none fits: the budget is below the smallest subnet of the "
                    f"{ctx.space.name} space ({_costs(over[budget])})")
                unmet.append({"space": name, "run": str(run), "budget": int(budget), "smallest_needs": over[budget]})
                continue
            best = evolution_search(ctx.space, predict, eff, budgets,
                                    EvolutionConfig(population=cfg.population, generations=cfg.generations),
                                    seed=cfg.seed, progress=progress)
            test_acc = ctx.accuracy(best["subnet"], "test")
            row = {"space": name, "run": str(run), "budget": int(budget), "subnet": best["subnet"],
                   "predicted_acc": best["predicted_acc"], "test_acc": test_acc,
                   **{k: best[k] for k in ("peak_memory", "macs", "latency_ms") if k in best}}
            # a yardstick for predictor + evolution: the best subnet among those measured for the
            # predictor that fits the budgets (ours, not part of OFA / MOOFA)
            fits = [r for r in records if within(r, budgets)]
            if fits:
                top = max(fits, key=lambda r: r["acc"])
                row["best_sampled"] = {"subnet": top["subnet"], "holdout_acc": top["acc"], "peak_memory": top["peak_memory"],
                                       "macs": top["macs"], "test_acc": ctx.accuracy(top["subnet"], "test")}
            results.append(row)
            log(f"[{name}] budget {budget:,}: peak {row['peak_memory']:,}, predicted {row['predicted_acc']:.2f}%, "
                f"test {test_acc:.2f}%")
    extra = {"config": asdict(cfg), "device": str(device), "predictors": predictors, "unmet": unmet,
             "wall_seconds": time.perf_counter() - t0}
    record = write_search_report(results, extra, data, out, spaces=names, budgets=cfg.budgets)
    log("\n" + format_search_table(results, spaces=names, budgets=cfg.budgets))
    log(f"\nwritten {out}/search.json, {out}/search.md, {out}/accuracy_vs_peak_memory.png")
    return record


def extract_subnet(run: str | Path, subnet: Mapping[str, Any], out: str | Path, *, device: str = "auto",
                   calibrate: bool = True, evaluate: bool = True, log=print) -> dict:
    """Writes the static network of ``subnet`` (BN recalibrated at its resolution) as
    model.safetensors + model.json in ``out``; returns its description (memory, MACs, accuracy,
    measured CUDA peak when a GPU is present)."""
    from pyengine.methods.ofa.memory import measure_cuda_peak, peak_memory_of_layout
    from pyengine.methods.ofa.train import recalibrate_bn, Resized
    from pyengine.methods.ofa.train import resolve_device
    from pyengine.train.checkpoint import save_model_export
    from pyengine.train.loop import evaluate as eval_loader

    dev = torch.device(resolve_device(device))
    ctx = RunContext(run, dev, log) if (calibrate or evaluate) else None
    if ctx is None:
        from pyengine.methods.ofa.train import load_supernet

        supernet, space, _ = load_supernet(run, dev)
    else:
        supernet, space = ctx.supernet, ctx.space
    sub = space.subnet(subnet)
    supernet.set_active(sub)
    if ctx is not None and calibrate:
        recalibrate_bn(supernet, ctx.calib_loader, dev, sub["r"])
    net = supernet.extract().eval()
    lay = net.layout
    mem = peak_memory_of_layout(lay, sub["r"])
    desc = {"architecture": {"name": "ofa_mbv3", "kwargs": {"num_classes": supernet.num_classes,
                                                            "in_channels": supernet.in_channels,
                                                            "arch": supernet.arch.to_dict(),
                                                            "subnet": {k: sub[k] for k in ("ks", "e", "d")}}},
            "space": space.name, "resolution": sub["r"], "subnet": sub, "layout": lay,
            "peak_memory": {k: v for k, v in mem.to_dict("float32").items() if k != "terms"}, "macs": subnet_macs(lay, sub["r"]),
            "params": sum(p.numel() for p in net.parameters()), "bn_recalibrated": bool(ctx is not None and calibrate)}
    if ctx is not None and evaluate:
        desc["test_acc"] = eval_loader(Resized(net, sub["r"]), ctx.loaders.test, dev)["acc"]
    cuda = measure_cuda_peak(net, sub["r"], supernet.in_channels) if torch.cuda.is_available() else None
    desc["cuda_peak"] = cuda
    net.to(dev)
    # what `pyengine export` needs: the input shape (one image at the subnet's resolution) and the
    # preprocessing (images resized to that resolution, normalised with the dataset's statistics)
    info = ctx.bundle.info if ctx is not None else None
    example = torch.zeros(1, supernet.in_channels, sub["r"], sub["r"])
    save_model_export(out, net, None, desc, example_input=example, image_size=sub["r"],
                      mean=[float(v) for v in info.mean] if info is not None else None,
                      std=[float(v) for v in info.std] if info is not None else None)
    return desc


def load_extracted(folder: str | Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """The static network ``extract_subnet`` wrote (weights from safetensors, shape from JSON)."""
    from pyengine._io import read_safetensors

    from pyengine.models.ofa_mbv3 import ofa_mbv3

    folder = Path(folder)
    desc = json.loads((folder / "model.json").read_text())
    net = ofa_mbv3(**desc["architecture"]["kwargs"])
    net.load_state_dict(read_safetensors(folder / "model.safetensors", "subnet"))
    return net.eval(), desc
