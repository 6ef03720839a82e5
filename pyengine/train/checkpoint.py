"""Checkpoints that never execute code when loaded.

* Resume state (model, optimiser, scheduler, masks, counters, RNG): ``torch.save`` written
  atomically (temporary file + os.replace) and read back with ``weights_only=True``.
* Exported models: tensors in safetensors plus a JSON description (architecture, masks'
  sparsity, metrics); loading rebuilds the architecture from the JSON by name.
"""
from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch

from pyengine._io import atomic_torch_save, atomic_write_text  # noqa: F401 (re-exported)
from pyengine._io import error_line, read_safetensors


class RunStateError(ValueError):
    """A saved run state that cannot be used (truncated, empty, foreign); the message says which file."""


STATE_KEYS = ("round", "epoch", "model", "masks", "config_json", "rounds_json")


def load_state(path: str | Path, map_location="cpu", required=()) -> dict:
    """Reads a resume state or snapshot; only tensors and plain containers are accepted
    (weights_only). A truncated, empty or foreign file raises RunStateError naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise RunStateError(f"{path} is empty (a run killed while writing it?); delete the run folder or use "
                            "another --out")
    try:
        st = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise RunStateError(f"cannot read {path}: it is truncated or not a pyengine state "
                            f"({error_line(exc)})") from None
    if not isinstance(st, dict):
        raise RunStateError(f"{path} is not a pyengine state (it holds a {type(st).__name__})")
    missing = [k for k in required if k not in st]
    if missing:
        raise RunStateError(f"{path} is not a pyengine run state: it lacks {missing}")
    return st


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        if not (path / "model.safetensors").exists():
            raise FileNotFoundError(f"--weights {path}: a folder must be a pyengine export holding model.safetensors")
        desc = json.loads((path / "model.json").read_text()) if (path / "model.json").exists() else {}
        if desc.get("edits") or desc.get("history"):
            raise ValueError(f"--weights {path}: this export's structure was edited (folded); start from an "
                             "unedited network (a run's state before folding, or a plain state dict)")
        path = path / "model.safetensors"
    if path.suffix == ".safetensors":
        sd = read_safetensors(path, "--weights")
        return {k: v for k, v in sd.items() if not k.startswith("mask::")}
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"--weights {path}: the file is empty")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise ValueError(f"--weights {path}: not a readable state dict ({error_line(exc)})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"--weights {path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(model: torch.nn.Module, path: str | Path, reset_head: bool = False) -> list[str]:
    """Loads a local state dict into ``model`` (a torchvision checkpoint, a .safetensors or .pt
    file, or a pyengine export folder). Missing or unexpected keys and shape mismatches raise an
    error that names them; ``reset_head`` keeps the model's own last Linear layer (another number
    of classes). Returns the keys that were kept from the model."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--weights {path} does not exist")
    sd = _read_state_dict(path)
    own = model.state_dict()
    skipped: list[str] = []
    if reset_head:
        last = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        if not last:
            raise ValueError("--reset-head: the model has no Linear classifier")
        prefix = last[-1] + "."
        skipped = [k for k in own if k.startswith(prefix)]
        sd = {k: v for k, v in sd.items() if not k.startswith(prefix)}
    missing = sorted(set(own) - set(sd) - set(skipped))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:8]}{' ...' if len(shapes) > 8 else ''}")
        hint = " (another number of classes? add --reset-head)" if shapes and not reset_head else ""
        raise ValueError(f"--weights {path} does not fit the model: {'; '.join(parts)}{hint}")
    model.load_state_dict({**{k: own[k] for k in skipped}, **sd})
    return skipped


def save_model_export(folder: str | Path, model: torch.nn.Module, masks: dict[str, torch.Tensor] | None,
                      description: dict, *, history=None, example_input: torch.Tensor | None = None,
                      formats=("safetensors",), image_size: int | None = None, mean=None,
                      std=None) -> dict:
    """Writes model.safetensors (weights, and masks as uint8 under 'mask::<name>') and
    model.json (how to rebuild the base architecture, the edit history that turns it into
    ``model``, the preprocessing, plus anything in ``description``); with
    ``formats=("safetensors", "onnx")`` also model.onnx. See
    :func:`pyengine.graph.export_model`; returns {format: path}."""
    from pyengine.graph import export_model

    return export_model(model, folder, description, history, example_input, formats,
                        masks=masks, image_size=image_size, mean=mean, std=std)


def _build_base(arch: dict) -> torch.nn.Module:
    from pyengine.models import build_model

    name = arch.get("name")
    if isinstance(name, str) and name.startswith("user:"):
        raise ValueError(f"this export's base architecture is the user model {name[5:]!r} (a Compressor export), "
                         "which pyengine cannot build by name: load it with "
                         "pyengine.graph.load_export(folder, lambda arch: YourModel())")
    kwargs = arch.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ValueError(f"architecture kwargs must be a dict, got {type(kwargs).__name__}")
    return build_model(arch["name"], **kwargs)


def load_model_export(folder: str | Path, device="cpu"):
    """Rebuilds a model saved by :func:`save_model_export`: (model, masks, description).

    The base architecture is built by name, the edit history is replayed on it (so a folded
    network comes back folded) and the weights are loaded from safetensors; mismatched keys or
    shapes and masks of the wrong shape raise ValueError naming them. Nothing is executed
    from the files."""
    from pyengine.graph import load_export

    return load_export(folder, _build_base, device)
