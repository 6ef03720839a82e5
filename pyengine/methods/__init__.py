"""Published methods composed from the layers below (ops, nn, models, train)."""
from pyengine.methods.egp import EGPConfig, egp_allocate, egp_prune_step
from pyengine.methods.magnitude import prune_magnitude

__all__ = ["EGPConfig", "egp_allocate", "egp_prune_step", "prune_magnitude"]
