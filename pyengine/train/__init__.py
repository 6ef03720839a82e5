"""Training loop, presets, distributed set-up and checkpoints."""
from pyengine.train.checkpoint import atomic_torch_save, load_state, save_model_export, load_model_export
from pyengine.train.dist import DistInfo, init_distributed
from pyengine.train.loop import TrainConfig, PRESETS, evaluate, make_optimizer, make_scheduler, train_epochs

__all__ = [
    "DistInfo",
    "PRESETS",
    "TrainConfig",
    "atomic_torch_save",
    "evaluate",
    "init_distributed",
    "load_model_export",
    "load_state",
    "make_optimizer",
    "make_scheduler",
    "save_model_export",
    "train_epochs",
]
