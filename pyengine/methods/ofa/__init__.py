"""Once-for-all supernets (OFA, ICLR 2020) and their memory-optimised variant (MOOFA, arXiv
2409.05900): spaces as data, the peak-memory model, progressive-shrinking training and
memory-bounded evolutionary search.

    from pyengine.methods.ofa import get_space, peak_memory
    space = get_space("moofa")
    peak_memory(space.arch, space.max_subnet(224)).peak_elements      # 696192

Sub-modules: spaces, memory, train (``ofa_train_step``, ``OFATrainer``), search, report,
command (``pyengine ofa``). Heavy ones are imported on use.
"""
from pyengine.methods.ofa.memory import PUBLISHED_PEAKS, MemoryEstimate, peak_memory, peak_memory_by_hooks, subnet_macs
from pyengine.methods.ofa.spaces import Space, get_space, memory_balanced_widths, moofa_space, ofa_space

__all__ = ["PUBLISHED_PEAKS", "MemoryEstimate", "Space", "get_space", "memory_balanced_widths", "moofa_space",
           "ofa_space", "peak_memory", "peak_memory_by_hooks", "subnet_macs"]
