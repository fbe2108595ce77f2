// Kernel arguments of the layer-norm CUDA kernels, shared by the host
// launcher (csrc/runtime/layer_norm_gpu.cc) and the device code
// (layer_norm.cu), so both see one layout. Passed by value to cuLaunchKernel.
#pragma once

#include <cstdint>

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

struct LayerNormFwdArgs {
  const void* x;
  const void* residual;  // or null
  const void* gamma;     // or null
  const void* beta;      // or null
  void* y;
  void* sum;   // or null
  void* mean;  // stats type
  void* rstd;  // stats type
  int64_t rows;
  int64_t cols;
  double epsilon;
  int32_t param_is_float;  // gamma/beta are float32 (else the input dtype)
  int32_t threads_per_row;
};

// dgamma/dbeta: block c of the row pass sums its rows' dy * xhat and dy into
// partial[c, 0, :] and partial[c, 1, :]; the column pass adds the blocks'
// partials in block order. Fixed order everywhere: deterministic, no atomics.
struct LayerNormBwdArgs {
  const void* dy;
  const void* dsum;  // or null
  const void* sum;
  const void* gamma;  // or null
  const void* mean;
  const void* rstd;
  void* dx;
  void* partial;  // [chunks, 2, cols] stats type
  void* dgamma;   // or null
  void* dbeta;    // or null
  int64_t rows;
  int64_t cols;
  int64_t rows_per_chunk;
  int64_t chunks;
  int32_t param_is_float;
  int32_t threads_per_row;
};

}  // namespace tfa
