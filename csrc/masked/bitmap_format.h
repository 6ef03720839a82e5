// The tile of the bitmap sparse format, for the CPU kernel (bitmap_cpu.cpp), the CUDA kernels
// (bitmap_kernels.h) and their glue; the layout itself is described in bitmap_kernels.h and next
// to the Python reference (pyengine/ops/masked.py, TILE_ROWS / TILE_COLS). No torch or CUDA headers.
#pragma once

namespace pyengine {

constexpr int kBmRows = 16;                       // rows of W per tile
constexpr int kBmCols = 64;                       // columns of W per tile
constexpr int kBmWords = kBmRows * kBmCols / 32;  // int32 bitmap words per tile (word 2r + h: row r, half h)

}  // namespace pyengine
