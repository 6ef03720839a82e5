"""Depth reduction methods (each registers itself by name): EASIER (linearise the lowest-entropy
activation per iteration), NEPENTHE (entropy-guided pruning that collapses layers, then folds
them) and LaCoOT (an optimal-transport regulariser, then blocks removed without fine-tuning)."""
from pyengine.methods.depth.easier import EASIER, EASIEROptions, easier_choice
from pyengine.methods.depth.lacoot import (
    ARCH_DEFAULTS,
    BlockPair,
    LaCoOT,
    LaCoOTOptions,
    find_block_pairs,
    lacoot_regulariser,
    score_blocks,
)
from pyengine.methods.depth.nepenthe import NEPENTHE, NepentheOptions

__all__ = ["ARCH_DEFAULTS", "BlockPair", "EASIER", "EASIEROptions", "LaCoOT", "LaCoOTOptions", "NEPENTHE",
           "NepentheOptions", "easier_choice", "find_block_pairs", "lacoot_regulariser", "score_blocks"]
