"""The Python face of pyengine's native kernels, each beside its pure-PyTorch reference."""
from pyengine._native import (
    check_device_errors,
    cpu_cache_info,
    empty_cpu_cache,
    masked_cache_clear,
    masked_cache_info,
)
from pyengine.ops.entropy import (
    EntropyStats,
    entropy_counts,
    entropy_counts_add_,
    entropy_counts_reference,
    entropy_from_counts,
    entropy_from_counts_reference,
    relu_count,
    samples_per_neuron,
)
from pyengine.ops.masked import (
    BitmapWeight,
    PackedWeight,
    apply_masks_,
    masked_linear,
    masked_linear_reference,
    pack_sparse,
    sparse_linear,
)
from pyengine.ops.sliced import (
    grouped_directions,
    random_directions,
    sliced_wasserstein,
    sliced_wasserstein_grouped,
    sliced_wasserstein_reference,
    sliced_work_bytes,
)

__all__ = [
    "BitmapWeight",
    "EntropyStats",
    "PackedWeight",
    "apply_masks_",
    "check_device_errors",
    "cpu_cache_info",
    "empty_cpu_cache",
    "entropy_counts",
    "entropy_counts_add_",
    "entropy_counts_reference",
    "entropy_from_counts",
    "entropy_from_counts_reference",
    "grouped_directions",
    "masked_cache_clear",
    "masked_cache_info",
    "masked_linear",
    "masked_linear_reference",
    "pack_sparse",
    "random_directions",
    "relu_count",
    "samples_per_neuron",
    "sliced_wasserstein",
    "sliced_wasserstein_grouped",
    "sliced_wasserstein_reference",
    "sliced_work_bytes",
    "sparse_linear",
]
