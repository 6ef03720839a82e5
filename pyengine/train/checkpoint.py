"""Checkpoints that never execute code when loaded.

* Resume state (model, optimiser, scheduler, masks, counters, RNG): ``torch.save`` written
  atomically (temporary file + os.replace) and read back with ``weights_only=True``.
* Exported models: tensors in safetensors plus a JSON description (architecture, masks'
  sparsity, metrics); loading rebuilds the architecture from the JSON by name.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch


def atomic_torch_save(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_state(path: str | Path, map_location="cpu") -> dict:
    """Reads a resume state; only tensors and plain containers are accepted (weights_only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


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
