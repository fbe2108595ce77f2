// Device helpers shared by every attention kernel family.
#pragma once

#include <cstdint>

#include "attention_args.h"

namespace tfa {

// The backward's workspace on the GPU: delta = rowsum(dO * O), float [B, N, T].
__device__ __forceinline__ float* delta_of(const AttentionBwdParams& a) { return static_cast<float*>(a.workspace); }

// The Philox key of the dropout mask: from device memory when the front end
// passed it there (AttentionParams::seed_device), else the params' value.
__device__ __forceinline__ uint64_t dropout_seed(const AttentionParams& a) {
  return a.seed_device ? *a.seed_device : a.seed;
}

// Whether query t may attend to key s of (b, n): inside the sequence, below
// the (top-left) causal diagonal, and allowed by the broadcast boolean mask.
__device__ __forceinline__ bool allowed(const AttentionParams& a, int64_t b, int64_t n, int64_t t, int64_t s) {
  if (t >= a.shape.seqlen_q || s >= a.shape.seqlen_k) return false;
  if (a.is_causal && s > t) return false;
  const auto& m = a.mask_strides;
  return !a.mask || a.mask[b * m.batch + n * m.head + t * m.row + s * m.col];
}

}  // namespace tfa
