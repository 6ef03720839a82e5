"""Building blocks on top of the ops: mask bookkeeping and entropy collection hooks."""
from pyengine.nn.entropy import EntropyCollector, LayerEntropy, measure_entropy
from pyengine.nn.masks import MaskSet, prunable_parameters

__all__ = ["EntropyCollector", "LayerEntropy", "MaskSet", "measure_entropy", "prunable_parameters"]
