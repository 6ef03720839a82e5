"""pyengine: a PyTorch model-compression engine with a C++/CUDA core."""
from pyengine._native import CUDA_COMPILED, HAS_NATIVE  # noqa: F401  (loads the native ops)

__version__ = "0.1.0"


def __getattr__(name):
    # the high-level API, imported on first use so `import pyengine` stays light
    if name == "Compressor":
        from pyengine.methods.compressor import Compressor

        return Compressor
    if name in ("RunConfig", "run", "get_method", "list_methods"):
        import pyengine.methods as m

        return getattr(m, name)
    raise AttributeError(f"module 'pyengine' has no attribute {name!r}")
