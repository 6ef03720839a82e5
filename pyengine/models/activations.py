"""Moved to :mod:`pyengine.graph.activations` (graph analysis lives below nn/ and models/).

This module re-exports its public names so that ``pyengine.models.activations`` keeps working."""
from pyengine.graph.activations import *  # noqa: F401,F403
from pyengine.graph.activations import __all__  # noqa: F401
