"""Moved to :mod:`pyengine.graph.activations` (graph analysis lives below nn/ and models/).

This module re-exports the names so that ``pyengine.models.activations`` keeps working."""
from pyengine.graph.activations import (  # noqa: F401
    ActivationSite,
    activation_kind,
    activation_map,
    find_functional_activations,
    find_producers,
    find_reused_activations,
    is_weight_layer,
    linearise,
    make_activations_distinct,
    neuron_dim,
    register_activation,
)
