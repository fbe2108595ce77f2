// Device helpers shared by every CUDA kernel of tf_fastattn.
//
// Compiled by NVRTC with no CUDA headers at all: float16 and bfloat16 are
// plain 16-bit storage types converted with PTX `cvt` (float16) or bit
// arithmetic (bfloat16), so a kernel compiles wherever NVRTC runs and needs no
// toolkit include directory. <cstdint> is an in-memory header the runtime
// provides (csrc/runtime/compiler.cc).
#pragma once

#include <cstdint>

namespace tfa {

// DType ids as in tf_fastattn::DType (common.h); variants are compiled with
// -DTFA_DTYPE=<id>.
enum : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

struct half_t {
  uint16_t bits;
};
struct bfloat16_t {
  uint16_t bits;
};

template <int kId>
struct TypeOf;
template <>
struct TypeOf<kFloat16> {
  using type = half_t;
};
template <>
struct TypeOf<kBFloat16> {
  using type = bfloat16_t;
};
template <>
struct TypeOf<kFloat32> {
  using type = float;
};
template <>
struct TypeOf<kFloat64> {
  using type = double;
};

// Accumulation type: float32 for every input type but float64.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// Inline PTX appears only in wrappers like this one (and in mma.cuh), each
// with a twin for the CPU emulation (csrc/emulation/cuda_emulation.h).
__device__ __forceinline__ float to_acc(half_t h) {
#ifdef TFA_EMULATION
  return tfa_emu::half_to_float(h.bits);
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.bits));
  return f;
#endif
}
__device__ __forceinline__ float to_acc(bfloat16_t h) { return __uint_as_float(static_cast<uint32_t>(h.bits) << 16); }
__device__ __forceinline__ float to_acc(float f) { return f; }
__device__ __forceinline__ double to_acc(double f) { return f; }

// Round to nearest even, like the CPU kernels (cpu_types.h) and ml_dtypes.
template <typename T>
__device__ __forceinline__ T from_acc(float f);
template <>
__device__ __forceinline__ half_t from_acc<half_t>(float f) {
  half_t h;
#ifdef TFA_EMULATION
  h.bits = tfa_emu::float_to_half(f);
#else
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
#endif
  return h;
}
template <>
__device__ __forceinline__ bfloat16_t from_acc<bfloat16_t>(float f) {
  const uint32_t u = __float_as_uint(f);
  bfloat16_t h;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    h.bits = static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN, sign kept
  } else {
    h.bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return h;
}
template <>
__device__ __forceinline__ float from_acc<float>(float f) {
  return f;
}
template <typename T>
__device__ __forceinline__ T from_acc(double f);
template <>
__device__ __forceinline__ double from_acc<double>(double f) {
  return f;
}

// The block's dynamic shared memory (16-byte aligned), as T.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
#ifdef TFA_EMULATION
  return static_cast<T*>(tfa_emu::dynamic_smem());
#else
  extern __shared__ __align__(16) unsigned char tfa_dynamic_smem[];
  return reinterpret_cast<T*>(tfa_dynamic_smem);
#endif
}

__device__ __forceinline__ float inf_f32() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ float nan_f32() { return __int_as_float(0x7fc00000); }

// Sum over the `width` lanes (a power of two <= 32) that share a row, in a
// fixed butterfly order: every lane gets the same, deterministic result.
template <typename A>
__device__ __forceinline__ A lanes_sum(A v, int width) {
  for (int o = width / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float lanes_max(float v, int width) {
  for (int o = width / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace tfa
