// Device helpers shared by every attention kernel family.
#pragma once

#include <cstdint>

#include "attention_args.h"

namespace tfa {

// Whether query t may attend to key s of (b, n): inside the sequence, below
// the (top-left) causal diagonal, and allowed by the broadcast boolean mask.
__device__ __forceinline__ bool allowed(const AttentionArgs& a, int64_t b, int64_t n, int64_t t, int64_t s) {
  if (t >= a.seqlen_q || s >= a.seqlen_k) return false;
  if (a.causal && s > t) return false;
  if (a.mask && !a.mask[b * a.mask_stride_b + n * a.mask_stride_n + t * a.mask_stride_t + s * a.mask_stride_s]) {
    return false;
  }
  return true;
}

}  // namespace tfa
