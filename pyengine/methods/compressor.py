"""Any method on your own model, in your own training loop (the Torch-Pruning style of use).

    import pyengine
    comp = pyengine.Compressor(model, "egp", example_input=torch.randn(1, 3, 32, 32), options={"zeta": 0.5})
    for rnd in range(3):
        train(comp.model, optimizer)          # your loop: call comp.apply_masks(optimizer) after each step
        comp.measure(train_loader)            # the statistic the method needs (entropy per activation)
        print(comp.step())                    # prune and/or edit, as the method decides
        optimizer = make_optimizer(comp.model)  # a structural edit may have replaced modules
    folded = comp.fold(train_loader)          # measured again (the last step changed the network):
                                              # identity / constant activations, exact folds
    comp.export("out/", formats=("safetensors", "onnx"))

Any torch.fx-traceable nn.Module works; a module that cannot be traced gets an error naming it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pyengine.methods import options as opts
from pyengine.methods.base import get_method
from pyengine.methods.runner import RunContext

__all__ = ["Compressor"]


def _run_example(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Runs the model once on ``example_input`` (eval mode, no gradients; a bad input is named
    here, not deep inside tracing later) and returns the activation modules it called more than
    once, with their number of calls."""
    from pyengine.graph import find_reused_activations

    try:
        return find_reused_activations(model, example_input)
    except Exception as exc:  # noqa: BLE001 - the user's forward, any error
        raise ValueError(f"example_input of shape {tuple(example_input.shape)} ({example_input.dtype}, "
                         f"{example_input.device}) does not run through {type(model).__name__}: "
                         f"{type(exc).__name__}: {exc}") from exc


def _check_sites(model: nn.Module, reused: dict[str, int], method, sites) -> None:
    """Refuses what an entropy-measuring method cannot see right: an activation module called
    twice per forward mixes two layers' statistics (an error); activations applied as functions
    (F.relu, x.relu()) are invisible (a warning; an error when no activation module is left)."""
    import warnings

    from pyengine.graph import find_functional_activations

    if method.entropy_spec() is None:
        return
    cls = type(method)
    if reused:
        raise ValueError(f"activation modules called more than once per forward: {reused} (name: calls); "
                         f"{cls.name} measures each activation's entropy, and one module would mix the layers' "
                         "statistics: give each use its own module (one nn.ReLU() per call; a module registered under "
                         "several names is split by pyengine.graph.make_activations_distinct(model))")
    functional = find_functional_activations(model)
    if functional:
        names = f"{functional[:8]}{' ...' if len(functional) > 8 else ''}"
        if not sites:
            raise ValueError(f"{type(model).__name__} applies its activations as functions ({names}), and "
                             f"{cls.name} finds activations as modules: use nn.ReLU() etc. modules instead")
        warnings.warn(f"{type(model).__name__}: activations applied as functions ({names}) are invisible to "
                      f"{cls.name}; only the activation modules are measured", RuntimeWarning, stacklevel=3)


class Compressor(RunContext):
    """A method bound to a user's model; the user owns data and training.

    Args:
        model: any torch.fx-traceable module (its activations must be modules, e.g. nn.ReLU).
        method: a registered method name ("egp", "imp", "magnitude", ...).
        example_input: one input batch (shape and device) used to trace the model.
        options: the method's options (its Options dataclass, or a dict).
        prunable: "conv+linear" / "linear" / a list of weight names (default: the method's choice).
        fold_max_mac_ratio: exact folds of two adjacent linear layers are refused when the merged
            layer would have more than this many times their MACs (default 1: never more; None or
            0: no limit).
    """

    def __init__(self, model: nn.Module, method: str = "egp", *, example_input: torch.Tensor, options=None,
                 prunable=None, fold_max_mac_ratio: float | None = 1.0, log=print):
        super().__init__()
        from pyengine.graph import trace

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(example_input, torch.Tensor):
            raise TypeError("example_input must be a tensor (one input batch)")
        trace(model)  # raises a TraceError that names the untraceable submodule
        cls = get_method(method)
        if options is None:
            o = cls.Options()
        elif isinstance(options, dict):
            o = opts.from_json(cls.Options, options)
        elif isinstance(options, cls.Options):
            o = options
        else:
            raise TypeError(f"options for method {cls.name!r} must be a dict or {cls.Options.__name__}, "
                            f"got {type(options).__name__}")
        opts.validate(o)
        reused = _run_example(model, example_input)
        self.model = model
        self.train_model = model
        # an export names the user's class; load it with pyengine.graph.load_export(folder, build)
        self.arch_name = f"user:{type(model).__module__}.{type(model).__qualname__}"
        self.example_input = example_input
        self.device = example_input.device
        if fold_max_mac_ratio is not None and not fold_max_mac_ratio >= 0:
            raise ValueError(f"fold_max_mac_ratio must be >= 0 or None, got {fold_max_mac_ratio}")
        self.fold_max_mac_ratio = fold_max_mac_ratio or None
        self.log = log
        self.refresh_sites()
        self.method = cls(o, self)
        _check_sites(model, reused, self.method, self.sites)
        if prunable is not None and not isinstance(prunable, str):
            prunable = list(prunable)
            names = dict(model.named_parameters())
            missing = [n for n in prunable if n not in names]
            if missing:
                raise ValueError(f"prunable names weights that {type(model).__name__} does not have: {missing} "
                                 f"(its weights: {[n for n in names if n.endswith('weight')][:12]} ...)")
        self._prunable = prunable or self.method.prunable(model) or "conv+linear"
        self._rebuild_masks()
        self._last: dict | None = None  # the latest measurement, None once a step() changed the network
        self._checked_optimizer = None  # the optimizer found to hold self.model's parameters
        self._round = 0
        self.stopped: str | None = None  # the method's reason to stop, once step() met it

    # ---- the user's loop -------------------------------------------------------------
    def apply_masks(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero pruned weights, their gradients and optimiser buffers (call after each step).

        An optimiser made before a :meth:`step` or :meth:`fold` that replaced the network's
        modules (a structural edit builds a new network) updates the old network's parameters,
        not ``self.model``'s: it is refused here with a RuntimeError instead of training nothing."""
        if optimizer is not None and optimizer is not self._checked_optimizer:
            self._check_optimizer(optimizer)
        self.masks.apply(optimizer)

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        own = {id(p) for p in self.model.parameters()}
        held = [p for g in optimizer.param_groups for p in g["params"]]
        if own and held and not any(id(p) in own for p in held):
            raise RuntimeError("the optimizer holds none of comp.model's parameters: a structural edit (step() "
                               "of a depth method, fold()) replaced the network, and this optimizer would go on "
                               "updating the old one; make a new optimizer from comp.model.parameters()")
        self._checked_optimizer = optimizer

    def step_callbacks(self):
        """The method's per-step hooks (loss terms, several forwards); see StepCallback."""
        return self.method.step_callbacks()

    def measure(self, loader=None, *, max_batches: int | None = None, spec=None, val_acc: float | None = None,
                test_acc: float | None = None) -> dict:
        """Measures the statistic the method needs over ``loader`` (input batches, or (x, y)
        pairs) and returns the round summary that :meth:`step` acts on."""
        spec = spec or self.method.entropy_spec()
        ent, constant = ({}, {})
        if spec is not None:
            if loader is None:
                raise ValueError(f"method {self.method.name} needs a loader to measure entropy")
            ent, constant = RunContext.measure(self, spec, loader, max_batches=max_batches)
        estimator = spec.estimator if spec is not None else "egp"
        from dataclasses import asdict

        self._last = {
            "round": self._round, "test_acc": test_acc, "val_acc": val_acc,
            "sparsity": self.masks.sparsity(), "emptied": self.masks.empty_layers(),
            "zero_entropy": sorted(e.name for e in ent.values() if e.value(estimator) == 0.0),
            "entropy_sites": [asdict(e) for e in ent.values()], "constant_neurons": constant,
        }
        return self._last

    def step(self, summary: dict | None = None) -> dict | None:
        """One round of the method on the last measurement: prune and/or edit. Returns what was
        done (None: nothing left to do)."""
        if self.stopped is not None:
            return None
        summary = summary or self._last
        if summary is None:
            if self.method.entropy_spec() is not None:
                raise RuntimeError(f"call measure(loader) before step(): {self.method.name} needs entropy")
            summary = self.measure()
        self.rounds.append(summary)
        reason = self.method.should_stop(self.rounds)  # the method's stop rule, as the runner applies it
        if reason:
            self.stopped = reason
            self.log(reason)
            return None
        rec = self.method.act(summary)
        self.masks.apply()
        self._checked_optimizer = None  # an edit may have replaced the parameters
        self._round += 1
        self._last = None
        return rec

    # ---- the result ------------------------------------------------------------------
    def fold(self, loader=None, *, summary: dict | None = None, max_batches: int | None = None) -> nn.Module:
        """Replace collapsed activations (all neurons constant) by identity or their constant, then
        apply every exact fold. Returns the new model (also ``self.model``); ``self.fold_record``
        says what was applied and refused.

        Which activations collapsed comes from a measurement of the network as it is now: over
        ``loader`` when given (in eval mode, the network the fold keeps: a method that counts in
        train mode, such as EASIER, is measured here without BatchNorm batch statistics), else the
        latest :meth:`measure` - unless a :meth:`step` changed the network after it (pruning can
        turn an always-ON activation into a mixed one, and folding on the old statistics would
        change the outputs): then a RuntimeError asks for a new one. ``summary`` folds on a
        measurement of your own making instead."""
        if isinstance(loader, dict) and summary is None:  # fold(summary), the older positional form
            summary, loader = loader, None
        if summary is None:
            if loader is not None:
                summary = self._measure_for_fold(loader, max_batches)
            elif self._last is not None:
                summary = self._last
            elif self.method.entropy_spec() is None:
                summary = self.measure()
            elif self.rounds:
                raise RuntimeError("fold() needs the entropy of the network as it is now, but the latest measure() "
                                   "came before the latest step(), which changed the network; call "
                                   "measure(loader) again or pass fold(loader)")
            else:
                raise RuntimeError(f"fold() needs a measurement: call measure(loader) or pass fold(loader) "
                                   f"({self.method.name} finds collapsed activations by their entropy)")
        self.fold_record = self.fold_collapsed(summary)
        self._last = None  # the folded network is a new one
        self._checked_optimizer = None
        return self.model

    def _measure_for_fold(self, loader, max_batches: int | None) -> dict:
        """The measurement a fold decides its collapses on: the method's statistic, taken on an
        eval-mode pass over ``loader`` - the network the fold must leave unchanged. A statistic the
        method gathers in train mode (EASIER's, NEPENTHE's ``entropy_when="train"``: BatchNorm batch
        statistics) can call an activation always OFF that the eval-mode network turns ON, and its
        edit would change the outputs; it is measured here in eval mode instead, with pooled counts,
        as the CLI run's final fold does (:meth:`RunContext.exact_collapse_summary`). The random
        state (torch, CUDA on the example's device, Python's ``random``) is left as it was, so a
        shuffling or augmenting loader does not change what the user's loop draws next. A method
        that measures nothing (magnitude, IMP) still folds what collapsed on ``loader``."""
        from pyengine.methods.base import EntropySpec

        spec = self.method.entropy_spec() or EntropySpec()
        exact = self.fold_spec(spec)
        if exact is None:
            return self.measure(loader, max_batches=max_batches, spec=spec)
        with self.random_state_kept():
            return self.measure(loader, max_batches=max_batches, spec=exact)

    def export(self, folder: str | Path, formats=("safetensors", "onnx"), description: dict | None = None,
               preprocessing: dict | None = None) -> list[str]:
        """Writes the current network (weights, masks, edit history; ONNX if asked). Load it back
        with ``pyengine.graph.load_export(folder, lambda arch: YourModel())``: your base model plus
        the recorded edits."""
        from pyengine.graph import export_model

        desc = {"architecture": {"name": self.arch_name, "kwargs": {}}, "method": self.method.name,
                **(description or {})}
        pre = preprocessing or {}
        written = export_model(self.model, folder, desc, self.edits, self.example_input.cpu(), formats,
                               masks=self.masks.state_dict(), image_size=pre.get("image_size"), mean=pre.get("mean"),
                               std=pre.get("std"))
        return [str(p) for p in written.values()]
