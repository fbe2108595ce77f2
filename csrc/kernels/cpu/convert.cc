// Vectorised dtype conversions (see convert.h).
#include "kernels/cpu/convert.h"

#include <cstring>

#include "kernels/cpu/cpu_types.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define TFA_X86 1
#endif

namespace tf_fastattn {
namespace cpu {
namespace {

// bfloat16 is the top half of a float32: widening is a shift, narrowing a
// branch-free round-to-nearest-even with NaNs kept quiet. Written on integers
// so the compiler vectorises it at any ISA level.
void bf16_to_float(const uint16_t* src, int64_t n, float* dst) {
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(src[i]) << 16;
}

void float_to_bf16(const float* src, int64_t n, uint16_t* dst) {
  const uint32_t* in = reinterpret_cast<const uint32_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = in[i];
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const uint32_t nan = (u >> 16) | 0x40u;
    dst[i] = static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
  }
}

#ifdef TFA_X86
__attribute__((target("avx512f"))) void half_to_float_avx512(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = to_float(half_t{src[i]});
}

__attribute__((target("avx512f"))) void float_to_half_avx512(const float* src, int64_t n, uint16_t* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = to_half(src[i]).bits;
}

__attribute__((target("avx2,f16c"))) void half_to_float_f16c(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = to_float(half_t{src[i]});
}

__attribute__((target("avx2,f16c"))) void float_to_half_f16c(const float* src, int64_t n, uint16_t* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = to_half(src[i]).bits;
}
#endif

enum class HalfPath { kScalar, kF16c, kAvx512 };

HalfPath half_path() {
#ifdef TFA_X86
  static const HalfPath path = __builtin_cpu_supports("avx512f")                                   ? HalfPath::kAvx512
                               : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) ? HalfPath::kF16c
                                                                                                    : HalfPath::kScalar;
  return path;
#else
  return HalfPath::kScalar;
#endif
}

void half_to_float(const uint16_t* src, int64_t n, float* dst) {
  switch (half_path()) {
#ifdef TFA_X86
    case HalfPath::kAvx512: return half_to_float_avx512(src, n, dst);
    case HalfPath::kF16c: return half_to_float_f16c(src, n, dst);
#endif
    default:
      for (int64_t i = 0; i < n; ++i) dst[i] = to_float(half_t{src[i]});
  }
}

void float_to_half(const float* src, int64_t n, uint16_t* dst) {
  switch (half_path()) {
#ifdef TFA_X86
    case HalfPath::kAvx512: return float_to_half_avx512(src, n, dst);
    case HalfPath::kF16c: return float_to_half_f16c(src, n, dst);
#endif
    default:
      for (int64_t i = 0; i < n; ++i) dst[i] = to_half(src[i]).bits;
  }
}

}  // namespace

void load_as_float(const void* src, DType t, int64_t n, float* dst) {
  switch (t) {
    case DType::kFloat16: return half_to_float(static_cast<const uint16_t*>(src), n, dst);
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(src), n, dst);
    case DType::kFloat32: std::memcpy(dst, src, n * sizeof(float)); return;
    case DType::kFloat64: {
      const double* d = static_cast<const double*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(d[i]);
      return;
    }
  }
}

void store_from_float(const float* src, int64_t n, DType t, void* dst) {
  switch (t) {
    case DType::kFloat16: return float_to_half(src, n, static_cast<uint16_t*>(dst));
    case DType::kBFloat16: return float_to_bf16(src, n, static_cast<uint16_t*>(dst));
    case DType::kFloat32: std::memcpy(dst, src, n * sizeof(float)); return;
    case DType::kFloat64: {
      double* d = static_cast<double*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = src[i];
      return;
    }
  }
}

}  // namespace cpu
}  // namespace tf_fastattn
