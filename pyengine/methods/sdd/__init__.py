"""Sparse double descent studies (methods.md section 6): the ``sdd`` method (IMP at 1-(1-r)^i with
train/test curves, DSD2 entropy, distillation, human label noise), the grid runner, the curves and
the plots behind ``pyengine sdd``.

    from pyengine.methods import RunConfig
    from pyengine.methods.sdd import Sweep
    summary = Sweep(RunConfig(model="resnet18", dataset="cifar10", preset="paper", noise=0.2,
                              options={"kd_teacher": "dense"}),
                    {"weight_decay_grid": [0.0, 1e-4, 5e-4]}).run()
"""
from pyengine.methods.sdd.curves import analyse, curve_rows, detect_double_descent, read_curve, write_curve
from pyengine.methods.sdd.method import SDD, KDLoss, SDDOptions, kd_loss, load_teacher, target_kept
from pyengine.methods.sdd.sweep import Sweep, SweepOptions, run_status, seed_from_dense

__all__ = ["SDD", "SDDOptions", "KDLoss", "kd_loss", "load_teacher", "target_kept", "Sweep", "SweepOptions",
           "run_status", "seed_from_dense", "curve_rows", "detect_double_descent", "analyse", "write_curve",
           "read_curve"]
