"""Exporting an (edited) network: safetensors + JSON (architecture, edit history,
preprocessing) and ONNX; loading it back without executing anything from the files.

Folder layout written by :func:`export_model`:

- ``model.safetensors``: the state dict, plus each mask as uint8 under ``mask::<param name>``;
- ``model.json``: ``architecture`` ({name, kwargs}: how to build the BASE network), ``edits``
  (the :class:`EditHistory` that turns it into the exported one), ``input_shape`` (one sample),
  ``preprocessing`` ({image_size, mean, std}) and whatever else the caller's description holds;
- ``model.onnx``: the network in eval mode, float32, batch dimension dynamic.

:func:`load_export` rebuilds base architecture -> :func:`replay` of the history -> weights from
safetensors. It takes the builder as an argument, since model zoos live above this package.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from pyengine._io import atomic_write_bytes, atomic_write_text
from pyengine.graph.edits import Edit, EditHistory, replay

__all__ = ["export_model", "load_export", "export_onnx", "EXPORT_FORMATS"]

EXPORT_FORMATS = ("safetensors", "onnx")
_MASK_PREFIX = "mask::"


def _history(history) -> EditHistory:
    if history is None:
        return EditHistory()
    if isinstance(history, EditHistory):
        return history
    return EditHistory(e if isinstance(e, Edit) else Edit.from_dict(e) for e in history)


def _check_masks(model: nn.Module, masks: dict[str, Tensor] | None) -> None:
    params = dict(model.named_parameters())
    for name, m in (masks or {}).items():
        if name not in params:
            raise ValueError(f"mask {name!r} names no parameter of the network")
        if tuple(m.shape) != tuple(params[name].shape):
            raise ValueError(f"mask {name!r} has shape {tuple(m.shape)} but parameter {name!r} "
                             f"has shape {tuple(params[name].shape)}")


def export_onnx(model: nn.Module, path: str | Path, example_input: Tensor,
                opset: int | None = None) -> Path:
    """Write ``model`` (eval mode, float32 copy) as ONNX with a dynamic batch dimension."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(f"ONNX export needs {' and '.join(missing)}: pip install 'pyengine[export]' "
                                  "(onnx, onnxscript, and onnxruntime to run the file)")
    path = Path(path)
    net = copy.deepcopy(model).float().eval()
    x = example_input.detach()
    x = x.float() if x.is_floating_point() else x  # token ids stay integers
    kwargs = {"dynamo": True, "verbose": False, "dynamic_shapes": ({0: torch.export.Dim("batch", min=1)},),
              "external_data": False}
    if opset is not None:
        kwargs["opset_version"] = opset
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with torch.no_grad():
            torch.onnx.export(net, (x,), tmp, **kwargs)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def export_model(model: nn.Module, folder: str | Path, description: dict,
                 history: EditHistory | Iterable[Edit] | None, example_input: Tensor | None,
                 formats: Sequence[str] = EXPORT_FORMATS, *,
                 masks: dict[str, Tensor] | None = None, image_size: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None
                 ) -> dict[str, Path]:
    """Write ``model`` (the edited network) to ``folder``; returns {format: path}.

    Args:
        model: the network to export (e.g. ``fold_network``'s result).
        description: JSON-serialisable dict; ``description["architecture"]`` = {"name",
            "kwargs"} says how to build the base network. Other keys (metrics, method, ...) are
            written as given.
        history: the completed edits turning the base network into ``model``.
        example_input: one input batch (its per-sample shape is recorded: replay traces shapes
            with it, and ONNX export runs it). May be None only for a safetensors-only export
            of a history without ``constant``/``remove_branch`` edits.
        formats: any of "safetensors" (always written with model.json) and "onnx".
        masks: ``{param name: bool mask}`` saved beside the weights (checked against them).
        image_size, mean, std: the preprocessing the network expects, recorded in model.json.
    """
    formats = (formats,) if isinstance(formats, str) else tuple(formats)  # "onnx" is one format, not four
    bad = [f for f in formats if f not in EXPORT_FORMATS]
    if bad or not formats:
        raise ValueError(f"formats must be a non-empty subset of {EXPORT_FORMATS}, got {formats}")
    if not isinstance(description, dict):
        raise TypeError(f"description must be a dict, got {type(description).__name__}")
    arch = description.get("architecture")
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        raise ValueError("description['architecture'] must be {'name': str, 'kwargs': dict}")
    hist = _history(history)
    needs_input = any(e.kind in ("constant", "remove_branch") for e in hist)
    if example_input is None and ("onnx" in formats or needs_input):
        raise ValueError("example_input is needed to export ONNX or a history with constant / "
                         "remove_branch edits")
    _check_masks(model, masks)
    for name, seq in (("mean", mean), ("std", std)):
        if seq is not None and not all(isinstance(v, (int, float)) for v in seq):
            raise TypeError(f"{name} must be a sequence of numbers")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")

    from safetensors.torch import save as safetensors_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    desc = dict(description)
    desc["architecture"] = {"name": arch["name"], "kwargs": dict(arch.get("kwargs", {}))}
    desc["edits"] = hist.to_list()
    desc["preprocessing"] = {"image_size": image_size,
                             "mean": list(mean) if mean is not None else None,
                             "std": list(std) if std is not None else None}
    if example_input is not None:
        desc["input_shape"] = list(example_input.shape[1:])
        desc["input_dtype"] = str(example_input.dtype).removeprefix("torch.")  # int64 token ids are no float
    desc["format_version"] = 2
    written: dict[str, Path] = {}

    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    for name, m in (masks or {}).items():
        tensors[f"{_MASK_PREFIX}{name}"] = m.detach().cpu().to(torch.uint8).contiguous()
    atomic_write_bytes(safetensors_bytes(tensors), folder / "model.safetensors")
    written["safetensors"] = folder / "model.safetensors"
    if "onnx" in formats:
        written["onnx"] = export_onnx(model, folder / "model.onnx", example_input)
        desc["onnx"] = "model.onnx"
    atomic_write_text(folder / "model.json", json.dumps(desc, indent=2))
    written["json"] = folder / "model.json"
    return written


def _cast_like(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Give every floating parameter and buffer of ``model`` named in ``state`` that tensor's
    dtype, in place (a parameter stays the same ``nn.Parameter`` object, so tied weights stay
    tied). Names ``state`` lacks and non-floating tensors are left as they are."""
    for prefix, mod in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                want = state.get(dot + name)
                if t is None or want is None or not t.is_floating_point() or not want.is_floating_point() \
                        or t.dtype == want.dtype:
                    continue
                if isinstance(t, nn.Parameter):
                    t.data = t.data.to(want.dtype)
                else:
                    table[name] = t.to(want.dtype)


def load_export(folder: str | Path, build: Callable[[dict], nn.Module], device="cpu"
                ) -> tuple[nn.Module, dict[str, Tensor], dict]:
    """Rebuild a network written by :func:`export_model`: (model, masks, description).

    ``build(architecture_dict)`` returns the base network. Its structure is then edited by
    :func:`replay` of ``description["edits"]`` (older exports' ``architecture["linearised"]``
    list is honoured too) and the weights are loaded from model.safetensors. Keys or shapes
    that do not match, and masks of the wrong shape or for no parameter, raise ValueError naming
    them. Every parameter and buffer gets the dtype it was saved with, also when the saved
    network mixes precisions (float16 / float32 / float64 layers side by side). Nothing in the
    folder is executed (JSON + safetensors only).
    """
    from pyengine._io import read_safetensors

    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist")
    json_path = folder / "model.json"
    if not json_path.is_file():
        raise FileNotFoundError(f"{json_path} does not exist: not a pyengine export folder")
    try:
        desc = json.loads(json_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{json_path} is not valid JSON: {exc}") from exc
    arch = desc.get("architecture")
    if not isinstance(arch, dict) or "name" not in arch:
        raise ValueError(f"{json_path} has no architecture {{name, kwargs}}")
    base = build(arch)
    history = EditHistory.from_list(desc.get("edits", []))
    if arch.get("linearised"):
        history = EditHistory([Edit("linearise", n) for n in arch["linearised"]] + list(history))
    input_dtype = desc.get("input_dtype")
    if input_dtype is not None and not isinstance(getattr(torch, str(input_dtype), None), torch.dtype):
        raise ValueError(f"{json_path}: input_dtype {input_dtype!r} is not a torch dtype")
    example = torch.zeros(1, *desc["input_shape"], dtype=getattr(torch, input_dtype) if input_dtype else None) \
        if "input_shape" in desc else None
    tensors = read_safetensors(folder / "model.safetensors", "export")
    state = {k: v for k, v in tensors.items() if not k.startswith(_MASK_PREFIX)}
    masks = {k[len(_MASK_PREFIX):]: v.bool() for k, v in tensors.items()
             if k.startswith(_MASK_PREFIX)}
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    built = {t.dtype for t in [*base.parameters(), *base.buffers()] if t.is_floating_point()}
    if len(dtypes) == 1 and len(built) <= 1:  # rebuild in the exported precision, so loading casts nothing
        dtype = dtypes.pop()
        base = base.to(dtype)
        example = example.to(dtype) if example is not None and example.is_floating_point() else example
    else:  # mixed precisions (in the file, or as ``build`` made the base on purpose): each
        # tensor the base shares with the file takes the file's dtype, the others stay as built;
        # before replay, which may run the network on the example
        _cast_like(base, state)
    model = replay(base, history, example)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs network {tuple(own[k].shape)}"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"{folder / 'model.safetensors'} does not fit the rebuilt network: "
                         f"missing {missing[:8]}, unexpected {unexpected[:8]}, "
                         f"shape mismatch {wrong[:8]}")
    _check_masks(model, masks)
    _cast_like(model, state)  # load_state_dict copies into the network's dtype: cast it first
    model.load_state_dict(state)
    model = model.to(device)
    masks = {k: v.to(device) for k, v in masks.items()}
    return model, masks, desc
