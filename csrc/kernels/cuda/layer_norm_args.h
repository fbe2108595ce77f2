// Kernel arguments of the layer-norm CUDA kernels, shared by the host
// launcher (csrc/runtime/layer_norm_gpu.cc) and the device code
// (layer_norm.cu), so both see one layout. Passed by value to cuLaunchKernel.
#pragma once

#include <cstdint>

#include "tf_fastattn/layer_norm_params.h"

namespace tfa {

// Launch shape. A "row group" of `threads_per_row` threads normalises one row:
// 32 (a warp per row, several rows per block) for short rows, the whole block
// for long ones. Each thread caches kVecs 16-byte vectors of the row in
// registers (a template parameter of the kernel); kVecs = 0 streams the row
// from global memory (L2) on every pass, for rows too long to cache.
//
// The largest kVecs compiled per element size (layer_norm.cu instantiates
// the same set), from ptxas' register counts at 512 threads per block (128
// registers): the forward caches up to 32 values per thread (8 vectors of
// float32, 4 of float16); the backward keeps s, dy and two partial sums per
// value, so it caches 2 vectors (4 for float64, whose vectors hold 2 values).
constexpr int kLayerNormMaxThreads = 512;
constexpr int layer_norm_max_vecs(int elem_bytes, bool backward) {
  return backward ? (elem_bytes == 8 ? 4 : 2) : (2 * elem_bytes < 8 ? 2 * elem_bytes : 8);
}

// The kernels take the host's params structs (tf_fastattn/layer_norm_params.h)
// by value, finalize()d and with the launch fields filled.
using tf_fastattn::LayerNormBwdParams;
using tf_fastattn::LayerNormFwdParams;

}  // namespace tfa
