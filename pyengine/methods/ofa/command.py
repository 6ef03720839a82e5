"""`pyengine ofa train|search|extract|memory`: argument parsing and wiring only.

The lead wires it into pyengine/cli.py with ``command.register(sub)`` and dispatches
``args.command == "ofa"`` to ``cmd_ofa(args)``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

OFA_EPILOG = """
examples:
  pyengine ofa memory --space ofa --resolution 224                           # 1,509,984 elements
  pyengine ofa memory --space ofa --resolution 128 --kernel 3 --expand 3 --depth 2 --json
  pyengine ofa memory --space moofa --resolution 224 --dtype int8
  pyengine ofa train --space moofa --width-mult 0.5 --out runs/moofa       # quick CPU demo on digits
  pyengine ofa train --space moofa --out runs/moofa --resume               # continue a killed run
  torchrun --nproc_per_node 8 -m pyengine ofa train --space moofa --preset moofa-imagenet \\
      --dataset imagefolder:/data/imagenet --device cuda --out runs/moofa-in1k
  pyengine ofa search --run runs/ofa --run runs/moofa --budgets 20000,30000,40000
  pyengine ofa extract --run runs/moofa --kernel 5 --expand 3 --depth 3 --resolution 32 --out nets/m
"""


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(float(t)) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _subnet_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", type=int, help="uniform kernel size of every block (default: the largest)")
    p.add_argument("--expand", type=_number, help="uniform expand ratio of every block (default: the largest)")
    p.add_argument("--depth", type=int, help="uniform depth of every stage (default: the largest)")
    p.add_argument("--arch", help='a per-block subnet as JSON text or a JSON file: {"ks": [...20], "e": [...20], '
                   '"d": [...5]} (optionally "r"); overrides --kernel/--expand/--depth')


def register(subparsers) -> argparse.ArgumentParser:
    """Adds ``ofa`` with its four sub-commands to the top-level sub-parsers."""
    from pyengine.methods.ofa.train import RECIPES

    p = subparsers.add_parser(
        "ofa", help="once-for-all supernets (OFA / MOOFA): train, memory-bounded search, extract, peak memory",
        description="Once-for-all MobileNetV3 supernets in the OFA and MOOFA (memory-optimised) spaces: progressive-"
        "shrinking training, a peak-memory model, and evolutionary search under a peak-memory budget.",
        epilog=OFA_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="ofa_command", required=True)

    t = sub.add_parser("train", help="train a supernet: full network, then progressive shrinking",
                       description="Train the full network, then shrink progressively (kernel -> depth -> expand) with "
                       "in-place distillation; resumable at any phase and epoch.")
    # no argparse defaults here: an option left out is the config's default, or with --resume the saved run's
    t.add_argument("--space", choices=["ofa", "moofa"], help="search space (default: ofa)")
    t.add_argument("--dataset", help="digits (offline), fashion-mnist, cifar10, cifar100, tiny-imagenet, "
                   "imagefolder:PATH (default: digits)")
    t.add_argument("--data-dir", help="folder searched first for the dataset's files")
    t.add_argument("--download", action="store_true", default=None, help="allow downloading a missing dataset")
    t.add_argument("--preset", choices=sorted(RECIPES),
                   help="quick: a CPU demo (few epochs, 32..56 px); ofa-imagenet / moofa-imagenet: the published "
                   "schedules (180 + 120 + 25 + 120 + 25 + 120 epochs, 128..224 px) (default: quick)")
    t.add_argument("--width-mult", type=_number, help="every width times this (default: 1)")
    t.add_argument("--divisor", type=int, help="channel counts rounded to multiples of this (default: 8)")
    t.add_argument("--resolutions", type=_ints, help="input resolutions of the space, e.g. 128,160,192,224")
    t.add_argument("--no-continuous", action="store_true", default=None, help="train only at the listed resolutions "
                   "(default: every multiple of 4 between the smallest and largest, as OFA)")
    t.add_argument("--phases", type=_names, help="run only these phases, e.g. full,kernel (default: all: full, kernel, "
                   "depth-1, depth-2, expand-1, expand-2)")
    t.add_argument("--epochs", type=int, help="epochs of every phase, without warm-up (default: the preset's)")
    t.add_argument("--steps-per-epoch", type=int, help="stop every epoch after this many steps (smoke tests)")
    t.add_argument("--batch-size", type=int, help="batch size per process (default: the preset's, 64)")
    t.add_argument("--lr-scale", type=_number, help="multiplies every phase's learning rate (> 0; default: 1)")
    t.add_argument("--workers", type=int, help="data-loader worker processes (default: 0)")
    t.add_argument("--val-fraction", type=_number, help="training images held out for validation and the "
                   "search's accuracy predictor, in [0, 1) (default: 0.1)")
    t.add_argument("--calib-images", type=int, help="training images used to recalibrate BatchNorm before evaluating a "
                   "subnet (>= 1; default: the preset's; OFA 2000)")
    t.add_argument("--out", help="run folder (default: runs/ofa-<space>-<dataset>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch; "
                   "options left out are the saved run's, options given must equal them")
    t.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: auto)")
    t.add_argument("--seed", type=int, help="seed of data split, initialisation and subnet sampling (default: 0)")
    t.add_argument("--no-amp", action="store_true", default=None, help="no bf16 autocast on CUDA")
    t.add_argument("--no-progress", action="store_true", default=None, help="no progress bars (log lines only; the "
                   "default when stderr is not a terminal)")

    s = sub.add_parser("search", help="accuracy predictor + evolutionary search under peak-memory budgets",
                       description="Measure sampled subnets, fit the accuracy predictor, and search each budget with "
                       "evolution; with several runs (e.g. OFA and MOOFA) one table and plot compares them. A budget "
                       "below a space's smallest subnet shows as 'none fits'. Exit status: 0 when at least one budget "
                       "was met; 2 (nothing measured) when no subnet of any run fits any budget, or on bad input.")
    s.add_argument("--run", action="append", required=True, help="a trained run folder (repeat for several)")
    s.add_argument("--budgets", type=_ints, required=True, help="peak-memory budgets in elements, e.g. 325000,400000")
    s.add_argument("--macs-budget", type=_number, help="also at most this many multiply-accumulates")
    s.add_argument("--latency-budget-ms", type=_number, help="also at most this latency (ms, batch 1, from a per-layer "
                   "table timed on --device)")
    s.add_argument("--samples", type=int, default=2000, help="subnets measured to train the predictor (default: 2000)")
    s.add_argument("--memory-bins", type=int, default=0, help="balance those subnets over this many peak-memory bins "
                   "(MOOFA's predictor data; default: 0, uniform sampling)")
    s.add_argument("--predictor-epochs", type=int, default=50, help="predictor training epochs (default: 50)")
    s.add_argument("--predictor-lr", type=float, default=1e-3, help="predictor Adam learning rate (default: 1e-3; "
                   "MOOFA's script: 3e-2)")
    s.add_argument("--population", type=int, default=100, help="evolution population (default: 100)")
    s.add_argument("--generations", type=int, default=500, help="evolution generations (default: 500)")
    s.add_argument("--out", help="output folder (default: <first run>/search)")
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    s.add_argument("--seed", type=int, default=0, help="seed of the subnet sampling and the evolution (default: 0)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars (the default when stderr is not a "
                   "terminal)")

    e = sub.add_parser("extract", help="write one subnet as a standalone network (BN recalibrated)",
                       description="Copy a subnet's weights out of a trained supernet into a static network, recalibrate "
                       "its BatchNorm at its resolution, evaluate it and save it (safetensors + JSON).")
    e.add_argument("--run", required=True, help="a trained run folder")
    _subnet_args(e)
    e.add_argument("--resolution", type=int, help="input resolution (default: the space's largest)")
    e.add_argument("--out", required=True, help="folder for model.safetensors and model.json")
    e.add_argument("--no-calibrate", action="store_true", help="keep the supernet's BN statistics (not advised)")
    e.add_argument("--no-eval", action="store_true", help="skip the test-set evaluation")
    e.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")

    m = sub.add_parser("memory", help="peak memory of a subnet (MOOFA's model), in elements and bytes",
                       description="Peak memory (elements, batch 1) of a subnet of the OFA or MOOFA space by the published "
                       "model: max over stem, blocks and final expand of input + output + weights of a conv (plus the "
                       "block input alive across a shortcut).")
    m.add_argument("--space", default="ofa", choices=["ofa", "moofa"])
    m.add_argument("--resolution", type=int, required=True, help="input resolution, e.g. 224")
    _subnet_args(m)
    m.add_argument("--width-mult", type=_number, default=1.0, help="every width times this (> 0; default: 1)")
    m.add_argument("--divisor", type=int, help="channel rounding (default: 8)")
    m.add_argument("--in-channels", type=int, default=3, help="input channels (default: 3)")
    m.add_argument("--dtype", default="float32", help="element type for the byte count (default: float32)")
    m.add_argument("--terms", action="store_true", help="also list every stem / block / final-expand term")
    m.add_argument("--measure", action="store_true", help="also measure a forward's peak on CUDA (random weights)")
    m.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=cmd_ofa)
    return p


def _subnet_from_args(args) -> dict:
    if args.arch:
        text = args.arch
        if not text.lstrip().startswith("{"):
            path = Path(text)
            if not path.exists():
                raise FileNotFoundError(f"--arch: {text} is neither JSON text nor an existing file")
            text = path.read_text()
        try:
            sub = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--arch is not valid JSON: {exc}") from None
        if not isinstance(sub, dict):
            raise ValueError('--arch must be a JSON object like {"ks": [...], "e": [...], "d": [...]}')
        return sub
    sub = {}
    for key, val in (("ks", args.kernel), ("e", args.expand), ("d", args.depth)):
        if val is not None:
            sub[key] = val
    return sub


# `ofa train` flags -> OFATrainConfig fields (the store_true flags negate the field)
_TRAIN_FIELDS = {"space": "space", "width_mult": "width_mult", "divisor": "divisor", "resolutions": "resolutions",
                 "no_continuous": "continuous_resolution", "dataset": "dataset", "data_dir": "data_dir",
                 "download": "download", "preset": "preset", "phases": "phases", "epochs": "epochs",
                 "steps_per_epoch": "steps_per_epoch", "batch_size": "batch_size", "lr_scale": "lr_scale",
                 "workers": "workers", "val_fraction": "val_fraction", "calib_images": "calib_images",
                 "no_amp": "amp", "out": "out", "seed": "seed", "device": "device", "no_progress": "progress"}
_NEGATED = ("no_continuous", "no_amp", "no_progress")


def _saved_train_config(out: Path) -> dict | None:
    """The options a run in ``out`` was started with (its config.json), or None."""
    from pyengine.methods.ofa.train import OFATrainConfig

    path = out / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # the run's state.pt is checked when the run starts
    if not isinstance(data, dict):
        return None
    known = OFATrainConfig.__dataclass_fields__
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}


def train_config_from_args(args):
    """An OFATrainConfig from parsed `ofa train` flags. With --resume, options not given on the
    command line come from the saved run (config.json in --out); options given that differ from it
    are refused when the run starts, each named."""
    from pyengine.methods.ofa.train import OFATrainConfig

    given = {}
    for dest, name in _TRAIN_FIELDS.items():
        v = getattr(args, dest, None)
        if v is not None:
            given[name] = (not v) if dest in _NEGATED else v
    kw: dict = {}
    if args.resume:
        probe = OFATrainConfig(**{k: v for k, v in given.items() if k in ("out", "space", "dataset")})
        saved = _saved_train_config(probe.out_dir())
        if saved is not None:
            kw.update({k: v for k, v in saved.items() if k not in ("out", "resume")})
            kw["out"] = str(probe.out_dir())
    kw.update(given)
    kw["resume"] = bool(args.resume)
    return OFATrainConfig(**kw)


def _train(args) -> int:
    from pyengine.methods.ofa.train import run_train

    run_train(train_config_from_args(args))
    return 0


def _search(args) -> int:
    from pyengine.methods.ofa.search import SearchConfig, run_search

    cfg = SearchConfig(runs=tuple(args.run), budgets=args.budgets, macs_budget=args.macs_budget,
                       latency_budget_ms=args.latency_budget_ms, samples=args.samples, memory_bins=args.memory_bins,
                       predictor_epochs=args.predictor_epochs, predictor_lr=args.predictor_lr,
                       population=args.population, generations=args.generations,
                       out=args.out, seed=args.seed, device=args.device, progress=not args.no_progress)
    run_search(cfg)
    return 0


def _extract(args) -> int:
    from pyengine.methods.ofa.report import format_memory
    from pyengine.methods.ofa.search import extract_subnet

    sub = _subnet_from_args(args)
    if args.resolution is not None:
        sub["r"] = args.resolution
    desc = extract_subnet(args.run, sub, args.out, device=args.device, calibrate=not args.no_calibrate,
                          evaluate=not args.no_eval)
    est = dict(desc["peak_memory"], cuda=desc.get("cuda_peak"))
    acc = f", test accuracy {desc['test_acc']:.2f}%" if "test_acc" in desc else ""
    print(f"extracted {desc['space']} subnet at {desc['resolution']} px: {desc['params']:,} parameters, "
          f"{desc['macs']:,} MACs{acc}")
    print(format_memory(est))
    print(f"written {args.out}/model.safetensors, {args.out}/model.json")
    return 0


def _memory(args) -> int:
    import torch

    from pyengine.methods.ofa.memory import dtype_size, measure_cuda_peak, peak_memory, subnet_macs
    from pyengine.methods.ofa.report import format_memory
    from pyengine.methods.ofa.spaces import get_space
    from pyengine.models.ofa_mbv3 import MobileNetV3Subnet, normalize_subnet, subnet_layout

    if args.resolution < 1:
        raise ValueError(f"--resolution must be >= 1, got {args.resolution}")
    if args.in_channels < 1:
        raise ValueError(f"--in-channels must be >= 1, got {args.in_channels}")
    if not (math.isfinite(args.width_mult) and args.width_mult > 0):
        raise ValueError(f"--width-mult must be a finite number > 0, got {args.width_mult}")
    if args.divisor is not None and args.divisor < 1:
        raise ValueError(f"--divisor must be >= 1, got {args.divisor}")
    dtype_size(args.dtype)  # a clear error for an unknown dtype
    space = get_space(args.space, args.width_mult, divisor=args.divisor)
    sub = normalize_subnet(space.arch, _subnet_from_args(args))
    r = args.resolution
    est = peak_memory(space.arch, sub, r, args.in_channels)
    rec = {"space": args.space, "resolution": r, "width_mult": args.width_mult, "in_channels": args.in_channels,
           "subnet": {k: sub[k] for k in ("ks", "e", "d")}, **est.to_dict(args.dtype)}
    lay = subnet_layout(space.arch, sub, args.in_channels)
    rec["macs"] = subnet_macs(lay, r)
    if not args.terms:
        rec.pop("terms")
    if args.measure:
        if torch.cuda.is_available():
            rec["cuda"] = measure_cuda_peak(MobileNetV3Subnet(lay), r, args.in_channels)
        else:
            rec["cuda"] = None
            print("no CUDA device: the measured peak is skipped", file=sys.stderr)
    if args.json:
        print(json.dumps(rec))
        return 0
    print(format_memory(rec, f"{args.space} space, {r} px, width x{args.width_mult}, {args.in_channels} input channel(s), "
                             f"{rec['macs']:,} MACs"))
    if args.terms:
        for t in est.terms:
            parts = ", ".join(f"{k} {v:,}" for k, v in t["convs"].items())
            print(f"  {t['name']:<13} {t['elements']:>12,}   ({parts})")
    return 0


def cmd_ofa(args) -> int:
    """Runs one ``pyengine ofa`` sub-command; bad input prints one error line and returns 2."""
    handlers = {"train": _train, "search": _search, "extract": _extract, "memory": _memory}
    try:
        return handlers[args.ofa_command](args)
    except KeyboardInterrupt:
        print("\ninterrupted; continue with the same command and --resume", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileExistsError, FileNotFoundError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"pyengine ofa {args.ofa_command}: error: {msg}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """``python -m pyengine.methods.ofa.command ...`` (the same as ``pyengine ofa ...``)."""
    ap = argparse.ArgumentParser(prog="pyengine")
    register(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return cmd_ofa(args)


if __name__ == "__main__":
    sys.exit(main())
