"""A sparse double descent study as one resumable job: a grid of runs (label noise x weight decay x
seed x width; vanilla, and distilled when a teacher is given), their curves and their plots.

Folder layout (``--out``)::

    sweep.json                  the grid and the base options (a resumed sweep must match them)
    dense/<config>/             one dense training per configuration (a run of rounds=0)
    runs/<config>-vanilla/      IMP from that dense network (the dense state is reused as round 0)
    runs/<config>-kd/           DSD2: the student trained with distillation from the start (dense
                                included), the teacher being the configuration's dense network or --kd-teacher
    curves/<run>.csv, .json     one row per sparsity, with the detected dip and second peak
    plots/*.png                 accuracy / loss vs weights remaining, entropy, model size
    summary.json                every run's analysis; the same table is printed

One dense checkpoint per configuration: its run ends after round 0; the vanilla run's folder is
seeded with that finished state (the runner's own state file, read with weights_only=True, marked
unfinished and given the vanilla run's config), so the vanilla run continues at round 1 exactly
as an uninterrupted run would; the KD run uses the exported dense network as its frozen teacher.

Resume: every run is a runner folder that resumes from its last finished epoch; the sweep skips
finished runs (report.json and final/ written) and continues the first unfinished one, so a killed
sweep resumes at the next unfinished round of the next unfinished run.

Several devices: ``devices=["0", "1", "2", "3"]`` starts one worker process per device
(``CUDA_VISIBLE_DEVICES`` set to it). Workers take whole configurations (dense -> vanilla -> KD)
under a file lock each (``claims/<config>.lock``, released by the OS if a worker dies), so no
configuration runs twice and a resumed sweep hands the unfinished ones out again. A worker ends
with the sweep that started it (SIGTERM to the sweep stops its workers; on Linux the kernel ends them
if the sweep is killed outright), so no worker trains on behind a sweep that has stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pyengine.methods import options as opts
from pyengine.methods.options import OptionError, option
from pyengine.methods.runner import PRESET_MODEL_OPTS, RUN_STATE_FORMAT, FileLock, Run, RunConfig
from pyengine.methods.sdd.curves import analyse, curve_rows, write_curve
from pyengine.methods.sdd.method import SDDOptions
from pyengine.train.checkpoint import STATE_KEYS, RunStateError, atomic_torch_save, atomic_write_text, load_state

__all__ = ["Sweep", "SweepOptions", "run_status", "seed_from_dense", "SWEEP_FORMAT"]

SWEEP_FORMAT = "pyengine-sdd-sweep-1"
KINDS = ("vanilla", "kd")
# The ViT study's settings (ICIAP 2023, the authors' SDD_ViT main.py), filled in when not given:
# ViT dropout 0.1 and embedding dropout 0.1 (batch 512: the vit preset); their CIFAR Swin
# downscales by 2 first and uses 4x4 windows (torchvision's Swin-T: patch 2, window 4).
PUBLISHED_MODEL_OPTS = {"vit": PRESET_MODEL_OPTS["vit"]["vit"], "swin_t": {"patch_size": 2, "window_size": 4}}


def _check_devices(v, _o):
    if v is None:
        return None
    if not v:
        return "needs at least one device"
    for d in v:
        d = str(d).strip()
        if d == "cpu" or d.isdigit() or (d.startswith("cuda:") and d[5:].isdigit()) or d == "cuda":
            continue
        return f"entries must be GPU indices (0,1), cuda:N or cpu, got {d!r}"
    return None


def _nonempty(v, _o):
    return "needs at least one value" if v is not None and len(v) == 0 else None


def _seeds(v, _o):
    if v is not None and any(not 0 <= s < 2**32 for s in v):
        return f"must be in [0, 2**32 - 1], got {v}"
    return _nonempty(v, _o)


@dataclass
class SweepOptions:
    """The grid of a sweep, declared once for the CLI (``pyengine sdd``), sweep.json and the API."""

    noise_grid: list[float] | None = option(None, "label-noise levels, one configuration each (default: --noise)",
                                            low=0.0, high=1.0, high_open=True, check=_nonempty)
    weight_decay_grid: list[float] | None = option(None, "weight decays (the l2 remedy), one configuration each "
                                                   "(default: --weight-decay, else the preset's)", low=0.0,
                                                   check=_nonempty)
    seeds: list[int] | None = option(None, "seeds, one configuration each (default: --seed)", check=_seeds)
    width_grid: list[int] | None = option(None, "model widths (model-size double descent): resnet18 width k (64 is "
                                          "the standard network), vgglike width 2^gamma (default: the model's)",
                                          low=1, check=_nonempty)
    devices: list[str] | None = option(None, "spread the runs over these devices, one worker process each: GPU "
                                       "indices 0,1,2,3 (or cuda:0,cuda:1), or cpu,cpu (default: one process on "
                                       "--device)", check=_check_devices, metavar="D0,D1,...")
    dip_tolerance: float = option(1.0, "accuracy points a dip must lie below the best points on both sides to "
                                  "count as a double descent", low=0.0)

    RUNTIME_ONLY = ("devices", "dip_tolerance")


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def config_key(c: dict) -> str:
    key = f"noise{_fmt(c['noise'])}_wd{_fmt(c['weight_decay'])}_seed{c['seed']}"
    return key + (f"_width{c['width']}" if c.get("width") is not None else "")


def run_status(folder: str | Path) -> str:
    """'done' (report and exported network written), 'partial' (a state to resume) or 'new'."""
    folder = Path(folder)
    if (folder / "report.json").exists() and (folder / "final" / "model.json").exists():
        return "done"
    return "partial" if (folder / "state.pt").exists() else "new"


def _jsonable(v):
    return json.loads(json.dumps(v, default=str))


def seed_from_dense(dense_dir: str | Path, run_dir: str | Path, cfg: RunConfig) -> None:
    """Start the run ``cfg`` in ``run_dir`` from the finished dense run in ``dense_dir`` (its round
    0): the dense state, marked unfinished and carrying ``cfg``'s options, is what a run of ``cfg``
    would have saved after its own round 0, so resuming it continues at round 1."""
    dense_dir, run_dir = Path(dense_dir), Path(run_dir)
    st = load_state(dense_dir / "state.pt", map_location="cpu", required=STATE_KEYS + ("rng", "done", "pruned"))
    if st.get("format") != RUN_STATE_FORMAT:
        raise RunStateError(f"{dense_dir / 'state.pt'} has state format {st.get('format')!r}; this sweep seeds "
                            f"{RUN_STATE_FORMAT!r} (rerun the dense run with this pyengine)")
    rounds = json.loads(st["rounds_json"])
    if not st["done"] or st["pruned"] or len(rounds) != 1 or st["round"] != 1 or json.loads(st.get("edits_json", "[]")):
        raise RunStateError(f"{dense_dir} is not a finished dense run (round 0 only, no edits)")
    saved = json.loads(st["config_json"])
    mine = _jsonable(cfg.to_json())
    skip = set(RunConfig.RUNTIME_ONLY) | {"rounds", "no_fold"}
    diffs = [f"{k}: {saved.get(k)!r} vs {v!r}" for k, v in mine.items() if k not in skip and saved.get(k) != v]
    if diffs:
        raise OptionError(f"the dense run in {dense_dir} was trained with other options ({'; '.join(diffs)})")
    st["done"] = False
    st["config_json"] = json.dumps(cfg.to_json(), default=str)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("rewind.pt", "metrics.jsonl"):  # the initial weights and round 0's records
        if (dense_dir / name).exists():
            shutil.copyfile(dense_dir / name, run_dir / name)
    atomic_torch_save(st, run_dir / "state.pt")  # last: its presence means the seeding is complete


class Sweep:
    """A grid of sdd runs in one folder. ``Sweep(base, grid).run()`` runs (or resumes) every run and
    returns the summary (also written to summary.json).

    base: a RunConfig whose method is sdd (set here) - model, dataset, preset, epochs, rounds,
        noise / weight_decay / seed (used when the grid does not list them), out (the sweep
        folder), resume, and the SDDOptions in ``options``; ``kd_teacher="dense"`` distils every
        configuration from its own dense network, a path from that one teacher.
    grid: SweepOptions (or a dict of its fields).
    on_epoch(run_name, round, epoch): called after every checkpoint (tests interrupt here).
    """

    def __init__(self, base: RunConfig, grid: SweepOptions | dict | None = None, *, log: Callable[[str], None] = print,
                 on_epoch: Callable[[str, int, int], None] | None = None):
        base = dataclasses.replace(base, method="sdd",
                                   model_opts={**PUBLISHED_MODEL_OPTS.get(base.model, {}), **(base.model_opts or {})})
        if isinstance(base.options, dict):
            base.options = opts.from_json(SDDOptions, base.options)
        elif base.options is None:
            base.options = SDDOptions()
        elif not isinstance(base.options, SDDOptions):
            raise OptionError(f"options must be SDDOptions or a dict, got {type(base.options).__name__}")
        base.validate()
        if grid is None:
            grid = SweepOptions()
        elif isinstance(grid, dict):
            grid = opts.from_json(SweepOptions, grid)
        opts.validate(grid)
        self.base, self.grid, self.log, self.on_epoch = base, grid, log, on_epoch
        self.out = Path(base.out) if base.out else self.default_out()
        self.configs = self.plan()

    # ------------------------------------------------------------------ the grid
    def default_out(self) -> Path:
        digest = hashlib.sha256(json.dumps(self.spec(), sort_keys=True, default=str).encode()).hexdigest()[:8]
        return Path(f"runs/sdd-{self.base.model}-{self.base.dataset}".replace(":", "_") + f"-{digest}")

    def resolved_grid(self) -> dict:
        from pyengine.train.loop import PRESETS

        b, g = self.base, self.grid
        wd_default = b.weight_decay if b.weight_decay is not None else PRESETS[b.preset].weight_decay
        return {"noise": list(g.noise_grid or [b.noise]), "weight_decay": list(g.weight_decay_grid or [wd_default]),
                "seed": list(g.seeds or [b.seed]), "width": list(g.width_grid or [None])}

    def kinds(self) -> list[str]:
        return ["vanilla", "kd"] if self.base.options.kd_teacher else ["vanilla"]

    def spec(self) -> dict:
        """What the sweep computes (compared on resume)."""
        return {"format": SWEEP_FORMAT, "base": _jsonable(self.base.identity()), "grid": self.resolved_grid(),
                "kinds": self.kinds()}

    def plan(self) -> list[dict]:
        """The configurations in run order, each {"key", "noise", "weight_decay", "seed", "width",
        "runs": [(name, kind), ...]}."""
        g = self.resolved_grid()
        if self.base.options.human_labels and any(float(n) != 0.0 for n in g["noise"]):
            # found now, not after the noise-free configurations have trained
            raise OptionError(f"--human-labels replaces the training labels: use it with --noise 0 (the grid has "
                              f"label noise {', '.join(_fmt(float(n)) for n in g['noise'])})")
        out, seen = [], set()
        for width, noise, wd, seed in itertools.product(g["width"], g["noise"], g["weight_decay"], g["seed"]):
            c = {"noise": float(noise), "weight_decay": float(wd), "seed": int(seed), "width": width}
            c["key"] = config_key(c)
            if c["key"] in seen:
                raise OptionError(f"the grid lists configuration {c['key']} twice")
            seen.add(c["key"])
            c["runs"] = [(f"{c['key']}-{k}", k) for k in self.kinds()]
            out.append(c)
        return out

    def run_names(self) -> list[str]:
        return [name for c in self.configs for name, _ in c["runs"]]

    def dense_dir(self, c: dict) -> Path:
        return self.out / "dense" / c["key"]

    def run_dir(self, name: str) -> Path:
        return self.out / "runs" / name

    def teacher_path(self, c: dict) -> str:
        t = self.base.options.kd_teacher
        if t == "dense":
            return str((self.dense_dir(c) / "final").resolve())
        return str(Path(t).resolve())

    def config_for(self, c: dict, kind: str, device: str | None = None) -> RunConfig:
        """The RunConfig of configuration ``c``'s dense run (kind "dense") or of one of its runs."""
        model_opts = dict(self.base.model_opts or {})
        if c["width"] is not None:
            model_opts["width"] = int(c["width"])
        o = dataclasses.replace(self.base.options, kd_teacher=self.teacher_path(c) if kind == "kd" else None)
        fields = dict(method="sdd", noise=c["noise"], weight_decay=c["weight_decay"], seed=c["seed"],
                      model_opts=model_opts, options=o, no_fold=True, resume=False)
        if kind == "dense":
            fields.update(rounds=0, out=str(self.dense_dir(c)))
        else:
            fields.update(out=str(self.run_dir(f"{c['key']}-{kind}")))
        if device is not None:
            fields["device"] = device
        return dataclasses.replace(self.base, **fields)

    # ------------------------------------------------------------------ bookkeeping
    def status(self) -> dict[str, str]:
        """{run name: 'done' | 'partial' | 'new'} (dense runs as '<config>-dense')."""
        st = {}
        for c in self.configs:
            st[f"{c['key']}-dense"] = run_status(self.dense_dir(c))
            for name, _k in c["runs"]:
                st[name] = run_status(self.run_dir(name))
        return st

    def config_done(self, c: dict) -> bool:
        return all(run_status(self.run_dir(n)) == "done" for n, _ in c["runs"])

    def _write_spec(self) -> None:
        path = self.out / "sweep.json"
        mine = self.spec()
        if path.exists() and not self.base.resume and not any(self.out.rglob("state.pt")):
            # a sweep that failed before any run saved a checkpoint (e.g. a bad option found at its
            # first run) left only its spec: a fresh sweep takes the folder over, as prune does
            self.log(f"{self.out}: replacing a sweep that never got to a checkpoint")
            path.unlink()
        if path.exists():
            saved = json.loads(path.read_text())
            if not self.base.resume:
                raise FileExistsError(f"{self.out} already holds a sweep; pass --resume to continue it or --out for a new one")
            diffs = []
            for part in ("base", "grid", "kinds"):
                a, b = saved.get(part), mine[part]
                if isinstance(a, dict) and isinstance(b, dict):
                    diffs += [f"{part}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                              if a.get(k) != b.get(k)]
                elif a != b:
                    diffs.append(f"{part}: {a!r} -> {b!r}")
            if diffs:
                raise OptionError(f"--resume: the sweep in {self.out} was started with other options ({'; '.join(diffs)}); "
                                  "resume with the same options or choose another --out")
            return
        if self.base.resume:
            raise FileNotFoundError(f"--resume: there is no sweep to continue in {self.out} (no sweep.json)")
        atomic_write_text(path, json.dumps(mine, indent=2))

    @classmethod
    def from_folder(cls, folder: str | Path, **kw) -> "Sweep":
        """The sweep saved in ``folder`` (as its workers rebuild it), set to resume."""
        folder = Path(folder)
        spec = json.loads((folder / "sweep.json").read_text())
        if spec.get("format") != SWEEP_FORMAT:
            raise ValueError(f"{folder}/sweep.json is not a {SWEEP_FORMAT} file")
        base = RunConfig.from_json({**spec["base"], "out": str(folder), "resume": True, "no_progress": True})
        g = spec["grid"]
        grid = SweepOptions(noise_grid=g["noise"], weight_decay_grid=g["weight_decay"], seeds=g["seed"],
                            width_grid=None if g["width"] == [None] else g["width"])
        return cls(base, grid, **kw)

    # ------------------------------------------------------------------ running
    def _ensure(self, cfg: RunConfig, name: str) -> None:
        st = run_status(cfg.out)
        if st == "done":
            return
        cfg = dataclasses.replace(cfg, resume=st == "partial")
        hook = None if self.on_epoch is None else (lambda rnd, ep, _n=name: self.on_epoch(_n, rnd, ep))
        self.log(f"[{name}] {'resuming' if st == 'partial' else 'starting'} ({cfg.out})")
        Run(cfg, on_epoch=hook, log=lambda s, _n=name: self.log(f"[{_n}] {s}")).run()

    def run_config(self, c: dict, device: str | None = None) -> None:
        """Configuration ``c``: its dense run, then each of its runs."""
        dense = self.config_for(c, "dense", device)
        self._ensure(dense, f"{c['key']}-dense")
        for name, kind in c["runs"]:
            cfg = self.config_for(c, kind, device)
            if kind == "vanilla" and run_status(cfg.out) == "new":
                seed_from_dense(dense.out, cfg.out, cfg)
            self._ensure(cfg, name)

    def work(self, device: str | None = None) -> list[str]:
        """Runs every configuration no other worker holds; returns the keys it ran."""
        done = []
        for c in self.configs:
            if self.config_done(c):
                continue
            lock = FileLock(self.out / "claims" / f"{c['key']}.lock")
            if not lock.try_acquire():
                continue  # another worker has it
            try:
                self.run_config(c, device)
                done.append(c["key"])
            finally:
                lock.release()
        return done

    def run(self) -> dict:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise OptionError("a sweep spreads its runs itself, one process per device: start it without torchrun "
                              "and pass --devices 0,1,... (each run then trains on one GPU)")
        self.out.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.out / ".sweep.lock")
        if not lock.try_acquire():
            raise FileExistsError(f"{self.out} is in use by another sweep; wait for it or choose another --out")
        try:
            self._write_spec()
            devices = self.grid.devices
            n = len(self.run_names())
            self.log(f"sweep {self.out}: {len(self.configs)} configuration(s), {n} run(s) "
                     f"({', '.join(self.kinds())}), {sum(s == 'done' for s in self.status().values())} of "
                     f"{n + len(self.configs)} runs (dense included) already finished")
            if devices and len(devices) > 1:
                self._fetch_dataset()
                self._spawn(devices)
            else:
                self.work(_device_name(devices[0]) if devices else None)
            missing = [k for k, s in self.status().items() if s != "done"]
            if missing:
                raise RuntimeError(f"runs not finished: {', '.join(missing)} (see {self.out}/logs); rerun with --resume")
            return self.collect()
        finally:
            lock.release()

    def _fetch_dataset(self) -> None:
        """With --download, the dataset is fetched here once before the workers start (each worker
        downloading into the same folder at once would corrupt the files)."""
        if not self.base.download:
            return
        from pyengine.data import build_dataset

        build_dataset(self.base.dataset, self.base.data_dir, image_size=self.base.image_size, download=True)

    def _spawn(self, devices: list[str]) -> None:
        import signal
        import threading

        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        procs = []

        def terminated(signum, _frame):  # `kill`, a scheduler's time limit: stop the workers too
            raise SystemExit(128 + signum)

        main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
        old_term = signal.signal(signal.SIGTERM, terminated) if main_thread else None
        try:
            for k, d in enumerate(devices):
                env = dict(os.environ)
                env[_PARENT_ENV] = str(os.getpid())  # a worker ends when this process does (_die_with_parent)
                dev = "cpu"
                if d != "cpu":
                    env["CUDA_VISIBLE_DEVICES"] = d.split(":", 1)[1] if d.startswith("cuda:") else ("0" if d == "cuda" else d)
                    dev = "cuda"
                path = logs / f"worker{k}-{d.replace(':', '')}.log"
                f = open(path, "a")
                cmd = [sys.executable, "-m", "pyengine.methods.sdd.sweep", "worker", str(self.out), "--device", dev]
                procs.append((subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT), f, path))
                self.log(f"worker {k} on {d} (pid {procs[-1][0].pid}), log {path}")
            last = None
            while any(p.poll() is None for p, _, _ in procs):
                done = sum(s == "done" for s in self.status().values())
                if done != last:
                    self.log(f"sweep {self.out}: {done}/{len(self.status())} runs finished (dense included)")
                    last = done
                time.sleep(5)
        except BaseException:
            for p, _, _ in procs:  # only the workers this sweep started
                if p.poll() is None:
                    p.terminate()
            for p, _, _ in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
            raise
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, old_term)
            for _, f, _ in procs:
                f.close()
        bad = [(p.returncode, path) for p, _, path in procs if p.returncode != 0]
        for rc, path in bad:
            tail = path.read_text().splitlines()[-15:]
            self.log(f"worker failed (exit {rc}), {path}:\n  " + "\n  ".join(tail))

    # ------------------------------------------------------------------ results
    def collect(self) -> dict:
        """Curves (CSV + JSON), plots and the summary of every finished run."""
        from pyengine.methods.sdd.plots import plot_curves, plot_entropy, plot_model_size

        tol = self.grid.dip_tolerance
        runs = []
        for c in self.configs:
            for name, kind in c["runs"]:
                rep = json.loads((self.run_dir(name) / "report.json").read_text())
                rows = curve_rows(rep["rounds"])
                meta = {k: c[k] for k in ("noise", "weight_decay", "seed", "width")}
                meta.update(kind=kind, config=c["key"], model=self.base.model, dataset=self.base.dataset,
                            preset=self.base.preset, rate=self.base.options.rate)
                write_curve(rows, self.out / "curves", name, meta, tol)
                runs.append({"name": name, **meta, "rows": rows, "analysis": analyse(rows, tol)})
        plots = []
        g = self.resolved_grid()

        def label(r, *fields):
            parts = []
            for f in fields:
                if f == "kind":
                    parts.append("KD" if r["kind"] == "kd" else "vanilla")
                elif f == "weight_decay":
                    parts.append(f"wd {_fmt(r['weight_decay'])}")
                else:
                    parts.append(f"{f} {_fmt(r[f])}")
            return ", ".join(parts)

        def group(by):
            out = {}
            for r in runs:
                out.setdefault(tuple(r[k] for k in by), []).append(r)
            return out

        width_sfx = lambda w: "" if w is None else f"_width{w}"  # noqa: E731
        # remedies side by side: every weight decay and KD for one noise level / seed / width
        for (noise, seed, width), rs in group(("noise", "seed", "width")).items():
            name = f"accuracy_noise{_fmt(noise)}_seed{seed}{width_sfx(width)}.png"
            curves = [{"label": label(r, "weight_decay", "kind"), "rows": r["rows"], "analysis": r["analysis"]} for r in rs]
            plots.append(plot_curves(curves, self.out / "plots" / name,
                                     f"{self.base.model} on {self.base.dataset}, noise {_fmt(noise)}, seed {seed}"
                                     + ("" if width is None else f", width {width}")))
            if self.base.options.entropy:
                p = plot_entropy(curves, self.out / "plots" / name.replace("accuracy_", "entropy_"))
                if p:
                    plots.append(p)
        if len(g["noise"]) > 1:  # the effect of label noise, one remedy at a time
            for (wd, seed, width, kind), rs in group(("weight_decay", "seed", "width", "kind")).items():
                name = f"noise_wd{_fmt(wd)}_seed{seed}{width_sfx(width)}_{kind}.png"
                curves = [{"label": label(r, "noise"), "rows": r["rows"], "analysis": r["analysis"]} for r in rs]
                plots.append(plot_curves(curves, self.out / "plots" / name,
                                         f"label noise, wd {_fmt(wd)}, {kind}, seed {seed}"))
        if len(g["width"]) > 1:
            pts = [{"label": label(r, "noise", "weight_decay", "kind"), "width": r["width"],
                    "dense_acc": r["analysis"]["dense_acc"], "best_acc": r["analysis"]["best"]["test_acc"]}
                   for r in runs if r["seed"] == g["seed"][0]]
            plots.append(plot_model_size(pts, self.out / "plots" / "model_size.png",
                                         f"{self.base.model}: accuracy vs width (seed {g['seed'][0]})"))
        summary = {"sweep": str(self.out), "spec": self.spec(), "tol": tol,
                   "runs": [{k: v for k, v in r.items() if k != "rows"} for r in runs],
                   "plots": [str(p) for p in plots]}
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=1, default=str))
        self.log(format_table(runs))
        self.log(f"written      {self.out}/curves/*.csv|json, {self.out}/plots/*.png, {self.out}/summary.json")
        return summary


def format_table(runs: list[dict]) -> str:
    """The terminal table: one line per run."""
    def pt(p):
        return "-" if p is None else f"{p['value']:.2f} @{p['sparsity']:.1%}"

    w = max([len(r["name"]) for r in runs] + [3])
    lines = ["", f"{'run':<{w}} {'dense %':>8} {'dip':>15} {'2nd peak':>15} {'final':>15} {'best':>15} {'DD':>3}"]
    for r in runs:
        a = r["analysis"]
        d = a["test_acc"]
        fin = a["final"]
        best = a["best"]
        lines.append(f"{r['name']:<{w}} {a['dense_acc']:>8.2f} {pt(d['dip']):>15} {pt(d['peak']):>15} "
                     f"{fin['test_acc']:>6.2f} @{fin['sparsity']:>7.1%} {best['test_acc']:>6.2f} @{best['sparsity']:>7.1%} "
                     f"{'yes' if d['double_descent'] else 'no':>3}")
    return "\n".join(lines) + "\n"


def _device_name(d: str) -> str:
    d = str(d).strip()
    return f"cuda:{d}" if d.isdigit() else d


_PARENT_ENV = "PYENGINE_SWEEP_PARENT"


def _die_with_parent() -> None:
    """A worker must not outlive the sweep that started it (killed, even with SIGKILL, it could not
    stop its workers itself): on Linux the kernel sends SIGTERM to this process when its parent
    dies; a parent already gone when this runs ends it now. The runs resume from their checkpoints."""
    parent = os.environ.get(_PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != int(parent):
        sys.exit("pyengine sdd worker: the sweep that started it has ended")


def _worker_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyengine.methods.sdd.sweep",
                                 description="a worker of a pyengine sdd sweep (started by the sweep itself)")
    ap.add_argument("role", choices=["worker"])
    ap.add_argument("folder")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    _die_with_parent()
    sweep = Sweep.from_folder(a.folder, log=lambda s: print(s, flush=True))
    keys = sweep.work(a.device)
    print(f"worker done: {', '.join(keys) or 'nothing left'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
