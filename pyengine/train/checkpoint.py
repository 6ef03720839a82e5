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
                      description: dict) -> None:
    """Writes model.safetensors (weights, and masks as uint8 under 'mask::<name>') and
    model.json (how to rebuild the architecture, plus anything in ``description``)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, m in (masks or {}).items():
        tensors[f"mask::{name}"] = m.detach().cpu().to(torch.uint8).contiguous()
    tmp = folder / ".model.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / "model.safetensors")
    atomic_write_text(folder / "model.json", json.dumps(description, indent=2))


def load_model_export(folder: str | Path, device="cpu"):
    """Rebuilds a model saved by :func:`save_model_export`: (model, masks, description)."""
    from safetensors.torch import load_file

    from pyengine.models import build_model, linearise

    folder = Path(folder)
    desc = json.loads((folder / "model.json").read_text())
    arch = desc["architecture"]
    model = build_model(arch["name"], **arch.get("kwargs", {}))
    if arch.get("linearised"):
        linearise(model, arch["linearised"])
    tensors = load_file(str(folder / "model.safetensors"), device=str(device))
    masks = {k[len("mask::"):]: v.bool() for k, v in tensors.items() if k.startswith("mask::")}
    state = {k: v for k, v in tensors.items() if not k.startswith("mask::")}
    model.load_state_dict(state)
    return model.to(device), masks, desc
