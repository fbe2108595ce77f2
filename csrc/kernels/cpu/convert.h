// Bulk conversions between storage dtypes and float32 buffers for the CPU
// kernels, vectorised with run-time dispatch (F16C/AVX-512 for float16,
// integer SIMD for bfloat16). Rounding is to nearest even, NaNs stay NaN.
#pragma once

#include <cstdint>

#include "tf_fastattn/common.h"

namespace tf_fastattn {
namespace cpu {

// dst[i] = float(src[i]) for src of dtype t (float16, bfloat16 or float32).
void load_as_float(const void* src, DType t, int64_t n, float* dst);

// dst[i] = t(src[i]) for dtype t (float16, bfloat16 or float32).
void store_from_float(const float* src, int64_t n, DType t, void* dst);

}  // namespace cpu
}  // namespace tf_fastattn
