"""Command line: argument parsing and wiring only; every command calls into pyengine.methods.

The flags of `pyengine prune` are generated from the declarations of RunConfig and of each
registered method's Options dataclass (pyengine.methods.options), so the CLI, the saved
config.json and the Python API cannot drift apart.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

PRUNE_EPILOG = """
examples:
  pyengine prune --model resnet18                       # EGP on the offline digits data, quick preset
  pyengine prune --model resnet18 --method imp --rounds 5 --rate 0.2
  pyengine prune --model vgg16_bn --image-size 32 --method magnitude --sparsity 0.9
  pyengine prune --model resnet18 --dataset cifar10 --download --preset paper --device cuda
  torchrun --nproc_per_node 4 -m pyengine prune --model resnet18 --dataset cifar10 --preset paper
  pyengine prune --model resnet18 --resume               # continue a killed run (same options)
  pyengine export runs/resnet18-egp-digits --format all  # safetensors + ONNX of the folded network
"""


def _method_option_fields():
    """{option name: ((field, type), [methods that take it])} over every registered method; an option
    declared by several methods (e.g. --sparsity) must be declared alike and becomes one flag."""
    from pyengine.methods.base import get_method, list_methods
    from pyengine.methods.options import cli_fields

    seen: dict[str, tuple[tuple, list[str]]] = {}
    for name in list_methods():
        for f, tp in cli_fields(get_method(name).Options):
            if f.name in seen:
                (f0, tp0), users = seen[f.name]
                same = tp0 == tp and all(f0.metadata.get(k) == f.metadata.get(k) for k in ("choices", "low", "high"))
                if not same:
                    raise RuntimeError(f"option {f.name!r} is declared differently by methods {users} and {name}")
                users.append(name)
            else:
                seen[f.name] = ((f, tp), [name])
    return seen


def _method_defaults(name: str, users: list[str]) -> dict[str, object]:
    """Each method's default for one option (after its own __post_init__)."""
    from pyengine.methods.base import get_method

    return {u: getattr(get_method(u).Options(), name) for u in users}


def _prune_parser(sub) -> argparse.ArgumentParser:
    from pyengine.methods import options as opts
    from pyengine.methods.base import get_method, list_methods
    from pyengine.methods.runner import RunConfig

    methods = list_methods()
    lines = [f"  {m:<10} {get_method(m).summary}" for m in methods]
    p = sub.add_parser(
        "prune",
        help="train, then prune / linearise / remove depth with a method, fold and report",
        description="Train a model, compress it round by round with a method, fold what collapsed into a "
        "shallower network, and report accuracy, sparsity, entropy, depth, MACs and latency.\n\nmethods:\n"
        + "\n".join(lines),
        epilog=PRUNE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    opts.add_to_parser(p, RunConfig, prefix="run_")
    for a in p._actions:  # the method's choices come from the registry
        if a.dest == "run_method":
            a.choices = methods
    g = p.add_argument_group("method options (each flag says which methods take it)")
    for name, (item, users) in sorted(_method_option_fields().items()):
        defaults = _method_defaults(name, users)
        if len(set(map(repr, defaults.values()))) > 1:  # say each method's own default
            users_text = " [" + ", ".join(f"{u}: default {d}" for u, d in defaults.items()) + "]"
            opts.add_fields(g, [item], prefix="m_", users=users_text, show_default=False)
        else:
            opts.add_fields(g, [item], prefix="m_", users=f" [{', '.join(users)}]")
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pyengine", description="pyengine: compress neural networks - make them "
                                 "sparse and shallower.")
    sub = ap.add_subparsers(dest="command", required=True)
    _prune_parser(sub)
    e = sub.add_parser("export", help="write a run's final (folded) network as safetensors and/or ONNX",
                       description="Export the final network of a finished run: model.safetensors + model.json "
                       "(architecture, edit history, preprocessing) and/or model.onnx.")
    e.add_argument("run_dir", help="a run folder (holding final/) or an export folder")
    e.add_argument("--format", default="all", choices=["safetensors", "onnx", "all"], help="what to write besides model.safetensors + model.json, which every export holds (default: all)")
    e.add_argument("--out", help="folder to write into (default: RUN_DIR/final)")
    sub.add_parser("info", help="show the build (native kernels, CUDA) and the available models, datasets and methods")
    for register in _extra_commands():
        register(sub)
    return ap


def _extra_commands():
    """Commands contributed by method packages (each module has register(subparsers))."""
    from pyengine.methods.ofa import command as ofa_command
    from pyengine.methods.sdd import command as sdd_command

    return [ofa_command.register, sdd_command.register]


def config_from_args(args) -> "object":
    """A RunConfig (with the method's options) from parsed `prune` flags. With --resume, options not
    given on the command line come from the saved run."""
    from pyengine.methods import options as opts
    from pyengine.methods.base import get_method
    from pyengine.methods.options import OptionError
    from pyengine.methods.runner import RunConfig

    base = None
    method_base = None
    if args.run_resume:
        probe = opts.from_namespace(RunConfig, args, prefix="run_")
        saved = _saved_config(probe)
        if saved is not None:
            given_run = {f.name: getattr(args, "run_" + f.name) for f in dataclasses.fields(RunConfig)
                         if getattr(args, "run_" + f.name, None) is not None}
            method_base = saved.pop("options", None)
            saved.update(given_run)
            base = saved
    if base is not None:
        cfg = RunConfig.from_json(base)
    else:
        cfg = opts.from_namespace(RunConfig, args, prefix="run_")
    mcls = get_method(cfg.method).Options
    own = {f.name for f in dataclasses.fields(mcls)}
    given = {k[2:]: v for k, v in vars(args).items() if k.startswith("m_") and v is not None}
    foreign = sorted(k for k in given if k not in own)
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise OptionError(f"{flags} {'is not an option' if len(foreign) == 1 else 'are not options'} of --method "
                          f"{cfg.method} (see `pyengine prune --help`)")
    values = dict(method_base or {})
    values.update(given)
    cfg.options = opts.from_json(mcls, values) if values else mcls()
    return cfg


def _config_from_state(path) -> dict | None:
    """The options a run saved with its resume state (None if unreadable)."""
    from pyengine.train.checkpoint import load_state

    try:
        st = load_state(path)
        data = json.loads(st["config_json"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data if isinstance(data, dict) else None


def _saved_config(probe) -> dict | None:
    from pyengine.methods.runner import RunConfig

    path = probe.out_dir() / "config.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except ValueError as exc:  # unreadable: the resume state carries the same options
        data = _config_from_state(probe.out_dir() / "state.pt")
        if data is None:
            raise ValueError(f"--resume: {path} is unreadable ({exc}) and {path.parent / 'state.pt'} holds no "
                             "readable options either; start the run again with another --out") from None
    data["resume"] = True
    data["out"] = str(probe.out_dir())
    known = {f.name for f in dataclasses.fields(RunConfig)}
    return {k: v for k, v in data.items() if k in known}


def cmd_prune(args) -> int:
    from pyengine.methods.runner import run

    run(config_from_args(args))
    return 0


def cmd_export(args) -> int:
    from pathlib import Path

    import torch

    from pyengine.graph import export_model
    from pyengine.train.checkpoint import load_model_export

    src = Path(args.run_dir)
    if not src.exists():
        raise FileNotFoundError(f"{args.run_dir} does not exist")
    folder = src / "final" if (src / "final" / "model.json").exists() else src
    extract_hint = ("a once-for-all supernet is not one network: extract a subnet with `pyengine ofa extract --run "
                    f"{src if (src / 'supernet').exists() else src.parent} --arch SUBNET --out DIR` and export DIR")
    if not (folder / "model.json").exists():
        if (src / "supernet" / "model.json").exists():
            raise ValueError(f"{args.run_dir} is an `ofa train` run: {extract_hint}")
        raise FileNotFoundError(f"{args.run_dir} holds no exported network (no final/model.json); finish the run first")
    try:
        saved = json.loads((folder / "model.json").read_text())
    except ValueError:
        saved = {}
    if isinstance(saved, dict) and saved.get("space") and "subnet" not in (saved.get("architecture") or {}).get("kwargs", {}):
        raise ValueError(f"{folder}: {extract_hint}")
    model, masks, desc = load_model_export(folder)
    if "input_shape" not in desc:
        raise ValueError(f"{folder}/model.json records no input shape: re-export it from its run")
    formats = ("safetensors", "onnx") if args.format == "all" else (args.format,)
    out = Path(args.out) if args.out else folder
    pre = desc.get("preprocessing") or {}
    dtype = getattr(torch, str(desc.get("input_dtype") or "float32"), None)
    dtype = dtype if isinstance(dtype, torch.dtype) and not dtype.is_floating_point else torch.float32  # token ids stay ints
    example = torch.zeros(1, *desc["input_shape"], dtype=dtype)
    keep = {k: v for k, v in desc.items()
            if k not in ("edits", "preprocessing", "input_shape", "input_dtype", "format_version", "onnx")}
    written = export_model(model.float().eval(), out, keep, desc.get("edits", []), example, formats, masks=masks,
                           image_size=pre.get("image_size"), mean=pre.get("mean"), std=pre.get("std"))
    for kind, path in written.items():
        print(f"{kind:<12} {path}")
    return 0


def cmd_info(args) -> int:
    import torch

    import pyengine
    from pyengine.data import list_datasets
    from pyengine.methods.base import get_method, list_methods
    from pyengine.models import list_models

    print(f"pyengine {pyengine.__version__}, torch {torch.__version__}")
    print(f"native kernels: {'yes' if pyengine.HAS_NATIVE else 'no (pure-PyTorch fallback)'}; CUDA kernels: "
          f"{'yes' if pyengine.CUDA_COMPILED else 'no'}; CUDA device: {torch.cuda.is_available()}")
    print(f"models: {', '.join(list_models())}, tv:<torchvision name>")
    print(f"datasets: {', '.join(list_datasets())}")
    print("methods:")
    for m in list_methods():
        print(f"  {m:<10} {get_method(m).summary}")
    return 0


def _say(line: str) -> None:
    """An error line for the user: once, from rank 0, when torchrun runs several processes (every
    rank meets the same bad option)."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"pyengine: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = _one_line_warning  # a terminal user gets the message, not a source line
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        if os.environ.get("RANK", "0") != "0":
            # under torchrun every rank meets the same data and options: rank 0 says it once
            warnings.simplefilter("ignore")
        return _run_command(args)


def _run_command(args) -> int:
    try:
        if args.command == "prune":
            return cmd_prune(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "info":
            return cmd_info(args)
        return args.func(args)
    except KeyboardInterrupt:
        _say("\ninterrupted; continue with the same command and --resume")
        return 130
    except FloatingPointError as exc:
        _say(f"pyengine: error: {exc}")
        return 3
    except (ValueError, KeyError, OSError, ModuleNotFoundError) as exc:  # incl. OptionError, RunStateError
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        if "\nOriginal Traceback" in str(msg):  # re-raised from a DataLoader worker: its last line
            last = [x for x in str(msg).splitlines() if x.strip()][-1]
            head, sep, rest = last.partition(": ")
            msg = rest if sep and all(part.isidentifier() for part in head.split(".")) else last
        if isinstance(exc, OSError) and not isinstance(exc, (FileExistsError, FileNotFoundError)) and exc.filename:
            msg = f"{exc.filename}: {exc.strerror or exc}"
        _say(f"pyengine: error: {msg}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
