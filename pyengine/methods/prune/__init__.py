"""Pruning methods: one-shot magnitude, IMP, EGP (each registers itself by name)."""
from pyengine.methods.prune.egp import EGP, EGPConfig, egp_allocate, egp_prune_step
from pyengine.methods.prune.magnitude import IMP, Magnitude, fraction_for_target, prune_magnitude

__all__ = ["EGP", "EGPConfig", "IMP", "Magnitude", "egp_allocate", "egp_prune_step", "fraction_for_target",
           "prune_magnitude"]
