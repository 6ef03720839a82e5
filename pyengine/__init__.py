"""pyengine: a PyTorch model-compression engine with a C++/CUDA core."""
from pyengine._native import CUDA_COMPILED, HAS_NATIVE  # noqa: F401  (loads the native ops)

__version__ = "0.1.0"
