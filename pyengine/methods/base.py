"""The method interface: every published method is a small class behind it, found by name.

A :class:`Method` says

* which layers it prunes (:meth:`Method.prunable`),
* which entropy statistics it needs and when (:meth:`Method.entropy_spec` -> :class:`EntropySpec`),
* what it adds to a training step (:meth:`Method.step_callbacks` -> :class:`StepCallback`: a loss
  term from the same forward's activations, a replaced loss, or a whole step of several forwards),
* what it does after a training run (:meth:`Method.act`: prune, and/or edit the structure),
* when to stop (:meth:`Method.should_stop`) and which round is the result (:meth:`Method.select`).

The generic runner (:mod:`pyengine.methods.runner`) drives any method: train, measure, act,
retrain, evaluate, checkpoint, report, fold, export. Methods register with :func:`register`;
the CLI's ``--method`` choices and per-method flags come from the registry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from pyengine.methods.options import option

if TYPE_CHECKING:  # the runner is above this module; only its type is named here
    from pyengine.methods.runner import RunContext

__all__ = ["EntropyAverage", "EntropySpec", "StepCallback", "Method", "register", "get_method", "list_methods", "METHODS"]


ENTROPY_AVERAGES = ("pooled", "batch")


@dataclass
class EntropyAverage:
    """The option every entropy-measuring method shares (declared once: one ``--entropy-average``)."""

    entropy_average: str = option("pooled", "layer entropy from the counts pooled over the whole pass (exact) or the "
                                  "mean of per-batch layer entropies, as the authors' code computes it (batch: to "
                                  "reproduce their numbers); collapses are decided on the pooled counts",
                                  choices=ENTROPY_AVERAGES)


@dataclass(frozen=True)
class EntropySpec:
    """Which activation-state statistic a method needs (methods.md section 0).

    estimator: "egp" - layer entropy is the mean over non-constant neurons (EGP);
        "easier" - the mean over all neurons (EASIER, NEPENTHE).
    inclusive: ON means z >= 0 (EASIER) instead of z > 0 (EGP, DSD2).
    per_position: neuron = channel x position (DSD2) instead of channel / hidden unit.
    when: "pass" - a separate pass after training over the training images without augmentation
        (EGP, DSD2); "train" - accumulated during the last epoch of each training run, in train
        mode with augmentation, at no extra cost (EASIER).
    train_mode: for "pass", run the pass in train mode (BatchNorm batch statistics); the running
        statistics are restored afterwards, so measuring never changes the model.
    average: "pooled" - layer entropy from the counts over the whole pass (exact integers, ours);
        "batch" - the mean of each batch's layer entropy, as the authors' code computes it (to
        reproduce their numbers). Collapse decisions use the pooled counts either way.
    """

    estimator: str = "egp"
    inclusive: bool = False
    per_position: bool = False
    when: str = "pass"
    train_mode: bool = False
    average: str = "pooled"

    def __post_init__(self):
        if self.estimator not in ("egp", "easier"):
            raise ValueError(f"estimator must be 'egp' or 'easier', got {self.estimator!r}")
        if self.average not in ENTROPY_AVERAGES:
            raise ValueError(f"average must be one of {ENTROPY_AVERAGES}, got {self.average!r}")
        if self.when not in ("pass", "train"):
            raise ValueError(f"when must be 'pass' or 'train', got {self.when!r}")


class StepCallback:
    """Per-step hooks of the training loop; override what you need.

    Called in this order each step: ``on_batch_start``; then either ``forward_backward`` (if it
    returns non-None it did the whole step's forwards and backwards itself - several forwards with
    gradient accumulation, as OFA does) or the plain path: forward, ``loss`` (replaces
    cross-entropy when non-None), ``extra_loss`` (added), backward; then ``after_backward``,
    the optimiser step, ``after_step``. ``on_train_start``/``on_train_end`` bracket a training
    run (register and remove forward hooks there).
    """

    def on_train_start(self, model: nn.Module) -> None:
        pass

    def on_train_end(self, model: nn.Module) -> None:
        pass

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        pass

    def on_batch_start(self, step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        pass

    def forward_backward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """Return (loss detached, logits for metrics) after calling backward yourself, or None."""
        return None

    def loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def extra_loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def after_backward(self, model: nn.Module) -> None:
        pass

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass


class Method:
    """Base class of the methods. Subclasses set ``name``, ``Options`` (a dataclass declared with
    :func:`pyengine.methods.options.option`), ``summary`` and override what they do.

    One instance serves one run; ``self.opt`` holds its options and ``self.run`` the
    :class:`~pyengine.methods.runner.RunContext` (model, masks, data, history, edit and prune
    helpers). Anything a method must remember across a kill goes in :meth:`state_dict`.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = None  # type: ignore[assignment]
    #: rounds after dense training when --rounds is not given, per preset ("*" = any other)
    default_rounds: ClassVar[dict[str, int]] = {"*": 1}
    #: whether rounds restart from rewound weights (--rewind) - pruning methods do
    uses_rewind: ClassVar[bool] = True
    #: whether select() may pick an earlier round than the last (then each candidate is snapshotted)
    keeps_best: ClassVar[bool] = False
    #: validation split used when --val-fraction is not given
    default_val_fraction: ClassVar[float] = 0.0

    def __init__(self, options: Any, run: "RunContext"):
        self.opt = options
        self.run = run

    # ---- what it acts on -------------------------------------------------------------
    def prunable(self, model: nn.Module) -> list[str] | None:
        """Weight names (``layer.weight``) this method may prune, or None for the run's default
        (every Conv/Linear weight of a CNN, every Linear weight of a transformer)."""
        return None

    def entropy_spec(self) -> EntropySpec | None:
        """The entropy statistic to measure after each training run, or None."""
        return None

    def step_callbacks(self) -> list[StepCallback]:
        return []

    # ---- the round -------------------------------------------------------------------
    def act(self, summary: dict) -> dict | None:
        """After training round ``summary['round']`` (evaluated, statistics in
        ``summary['entropy_sites']``): prune through ``self.run.masks`` and/or edit through
        ``self.run.edit(...)``. Return a JSON record of what was done, or None when there is
        nothing left to do (the run then stops)."""
        return None

    def rounds_for(self, preset: str) -> int | None:
        """Rounds after dense training when --rounds is not given, when they depend on the model
        or the method's options (EASIER: one per activation); None: ``default_rounds``."""
        return None

    def should_stop(self, rounds: list[dict]) -> str | None:
        """A reason to stop after the latest round, or None to go on."""
        return None

    def select(self, rounds: list[dict]) -> int:
        """Index into ``rounds`` of the network that is the run's result (default: the last)."""
        return len(rounds) - 1

    def finish(self, result: dict) -> dict | None:
        """After the last round, before folding and the report: a last act on the selected
        network (e.g. LaCoOT ranks blocks and removes them without fine-tuning). Return a JSON
        record for the report (``report["method_result"]``) or None. When the record holds
        ``test_acc``, that is the accuracy of the network finish() left (the result's)."""
        return None

    def summary_extra(self, summary: dict) -> dict:
        """Method-specific columns added to a round's summary record."""
        return {}

    # ---- persistence -----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: makes a method available by ``cls.name`` (CLI ``--method``)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.Options is None:
        raise ValueError(f"method {cls.name} declares no Options dataclass")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({METHODS[cls.name].__name__})")
    METHODS[cls.name] = cls
    return cls


def _load_builtin() -> None:
    # importing the packages registers their methods
    import pyengine.methods.depth  # noqa: F401
    import pyengine.methods.prune  # noqa: F401
    import pyengine.methods.sdd  # noqa: F401


def get_method(name: str) -> type[Method]:
    _load_builtin()
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def list_methods() -> list[str]:
    _load_builtin()
    return sorted(METHODS)
