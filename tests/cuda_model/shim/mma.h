// Stands in for CUDA's <mma.h> in the CPU model: WMMA comes from tests/cuda_model/model.h.
#pragma once
