"""``pyengine sdd``: a sparse double descent study from the command line.

The flags come from three declarations: the run options (RunConfig, as ``pyengine prune``, less
the ones the protocol fixes: method, rewinding, folding), the sdd method's options (SDDOptions)
and the grid (SweepOptions).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

EPILOG = """
examples:
  pyengine sdd --model resnet18 --dataset cifar10 --noise 0.2 --preset paper --download   # 34 rounds, r = 0.2
  pyengine sdd --noise-grid 0,0.2 --rounds 4                                # offline digits, quick preset
  pyengine sdd --noise 0.2 --weight-decay-grid 0,1e-4,5e-4                  # the l2 remedy, one curve each
  pyengine sdd --noise 0.2 --kd-teacher dense                               # DSD2: distil from each dense net
  pyengine sdd --noise 0.2 --kd-teacher runs/teacher --kd-alpha 0.8 --kd-temperature 10
  pyengine sdd --model vgglike --width-grid 4,8,16,32,64 --noise 0.2        # model-size double descent
  pyengine sdd --model vit --preset vit --dataset cifar10 --noise 0.2       # ViT: AdamW, Linear layers pruned
  pyengine sdd ... --devices 0,1,2,3                                        # one worker process per GPU
  pyengine sdd ... --out runs/study --resume                                # continue a killed sweep

--kd-teacher dense distils every configuration's student from that configuration's own dense
network (trained once, also reused as round 0 of its vanilla run).
"""

# RunConfig fields the protocol fixes (IMP with learning-rate rewinding and full retraining, no folding)
_FIXED = ("method", "rewind", "rewind_epoch", "finetune_epochs", "no_fold", "options", "model_opts")


def register(subparsers) -> argparse.ArgumentParser:
    from pyengine.methods import options as opts
    from pyengine.methods.runner import RunConfig
    from pyengine.methods.sdd.method import SDDOptions
    from pyengine.methods.sdd.sweep import SweepOptions

    p = subparsers.add_parser(
        "sdd",
        help="sparse double descent: IMP curves over a grid of label noise, weight decay, seeds, widths, with "
        "distillation and entropy",
        description="Sparse double descent studies (ICIP 2023, ECML-PKDD-W 2023, DSD2 AAAI 2024, ICIAP 2023): for "
        "each configuration train dense, then prune r of the remaining weights per round (sparsity 1-(1-r)^i) with "
        "learning-rate rewinding and full retraining, recording test and train accuracy and loss at every "
        "sparsity; curves (CSV, JSON), the dip and second peak, and plots.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_items = [(f, tp) for f, tp in opts.cli_fields(RunConfig) if f.name not in _FIXED]
    opts.add_fields(p, run_items, prefix="run_")
    for a in p._actions:
        if a.dest == "run_model":
            a.help = "resnet18 (CIFAR stem; --width-grid sets its width), vgglike (DSD2; --depth), vit, swin_t, " \
                     "resnet34/50, vgg11/13/16/19_bn, mobilenet_v2, tv:<name> (default: resnet18)"
        if a.dest == "run_rounds":
            a.help = "pruning rounds after dense training (default: 34 under --preset paper/vit/swin, 5 under quick)"
        if a.dest == "run_batch_size":
            a.help = "batch size per process (default: the preset's; 512 under --preset vit, as published)"
        if a.dest == "run_out":
            a.help = "sweep folder (default: runs/sdd-<model>-<dataset>-<hash of the options>)"
        if a.dest == "run_resume":
            a.help = "continue the sweep in --out: finished runs are kept, the first unfinished run resumes " \
                     "from its last finished epoch"
    g = p.add_argument_group("sdd method")
    opts.add_to_parser(g, SDDOptions, prefix="m_")
    for a in g._group_actions:
        if a.dest == "m_kd_teacher":
            a.help = ("distil from a frozen teacher (DSD2): 'dense' = each configuration's own dense network, or a "
                      "pyengine export / run folder (any architecture), or a .safetensors / .pt state dict")
    g.add_argument("--depth", dest="x_depth", type=int, default=None, metavar="DELTA",
                   help="vgglike: number of conv blocks (DSD2's delta, default 5)")
    s = p.add_argument_group("grid")
    opts.add_to_parser(s, SweepOptions, prefix="s_")
    p.set_defaults(func=cmd_sdd)
    return p


def sweep_from_args(args):
    """(base RunConfig, SweepOptions) from parsed flags; with --resume, what was not given comes
    from the saved sweep."""
    from pyengine.methods import options as opts
    from pyengine.methods.options import OptionError
    from pyengine.methods.runner import RunConfig
    from pyengine.methods.sdd.method import SDDOptions
    from pyengine.methods.sdd.sweep import Sweep, SweepOptions

    if args.x_depth is not None and args.x_depth < 1:
        raise OptionError(f"--depth must be >= 1, got {args.x_depth}")
    given_run = {f.name: getattr(args, "run_" + f.name) for f in dataclasses.fields(RunConfig)
                 if getattr(args, "run_" + f.name, None) is not None}
    given_m = {f.name: getattr(args, "m_" + f.name) for f in dataclasses.fields(SDDOptions)
               if getattr(args, "m_" + f.name, None) is not None}
    grid = opts.from_namespace(SweepOptions, args, prefix="s_")
    run_fields = {**given_run}
    options = dict(given_m)
    model_opts = {}
    if args.x_depth is not None:
        model_opts["depth"] = args.x_depth
    saved_folder = Path(given_run["out"]) if given_run.get("out") else None
    if given_run.get("resume") and saved_folder is not None and (saved_folder / "sweep.json").exists():
        # the saved sweep's options, then what was given on top (a real change is refused by Sweep)
        saved = Sweep.from_folder(saved_folder)
        base = saved.base.to_json()
        for k in RunConfig.RUNTIME_ONLY:
            base.pop(k, None)
        options = {**base.pop("options"), **options}
        model_opts = {**base.pop("model_opts"), **model_opts}
        run_fields = {**base, **given_run}
        g = dataclasses.asdict(saved.grid)
        for f in dataclasses.fields(SweepOptions):
            if getattr(args, "s_" + f.name, None) is None and f.name not in SweepOptions.RUNTIME_ONLY:
                setattr(grid, f.name, g[f.name])
    run_fields.update(method="sdd", options=options, model_opts=model_opts)
    cfg = RunConfig.from_json(run_fields)
    opts.validate(grid)
    return cfg, grid


def cmd_sdd(args) -> int:
    from pyengine.methods.sdd.sweep import Sweep

    cfg, grid = sweep_from_args(args)
    Sweep(cfg, grid).run()
    return 0
