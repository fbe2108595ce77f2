// Scalar element types of the CPU kernels and their float conversions.
//
// float16 and bfloat16 are stored as raw 16-bit patterns; kernels load them to
// float32, compute in float32 and round back to nearest-even on store, which
// is what TensorFlow's Eigen::half / bfloat16 casts do.
#pragma once

#include <cstdint>
#include <cstring>

#include "tf_fastattn/common.h"

namespace tf_fastattn {
namespace cpu {

struct half_t {
  uint16_t bits;
};
struct bfloat16_t {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float to_float(half_t h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1Fu;
  uint32_t mant = h.bits & 0x3FFu;
  if (exp == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (mant << 13));  // inf / nan
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    // subnormal: value = mant * 2^-24
    float f = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline half_t to_half(float f) {
  uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) {  // inf or nan
    return half_t{static_cast<uint16_t>(sign | 0x7C00u | (a > 0x7F800000u ? 0x200u : 0u))};
  }
  if (a >= 0x477FF000u) return half_t{static_cast<uint16_t>(sign | 0x7C00u)};  // rounds to inf
  if (a < 0x38800000u) {
    // subnormal or zero in half: round a * 2^24 to nearest even integer
    float af = bits_to_float(a) * 16777216.0f;  // exact scaling
    // rint with ties to even through the float adder
    float r = (af + 12582912.0f) - 12582912.0f;
    return half_t{static_cast<uint16_t>(sign | static_cast<uint16_t>(r))};
  }
  // normal: rebias exponent, round mantissa to 10 bits, nearest even
  uint32_t rounded = a + 0xFFFu + ((a >> 13) & 1u);
  return half_t{static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13))};
}

inline float to_float(bfloat16_t b) { return bits_to_float(static_cast<uint32_t>(b.bits) << 16); }

inline bfloat16_t to_bfloat16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return bfloat16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet nan
  u += 0x7FFFu + ((u >> 16) & 1u);
  return bfloat16_t{static_cast<uint16_t>(u >> 16)};
}

inline float to_float(float f) { return f; }
inline double to_float(double d) { return d; }

// Store a float (or double) accumulator as element type T.
template <typename T>
inline T from_float(float f);
template <>
inline float from_float<float>(float f) { return f; }
template <>
inline half_t from_float<half_t>(float f) { return to_half(f); }
template <>
inline bfloat16_t from_float<bfloat16_t>(float f) { return to_bfloat16(f); }

// Accumulation type: float32 for every type but double.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

template <typename T>
inline T from_acc(typename AccType<T>::type v) {
  return from_float<T>(v);
}
template <>
inline double from_acc<double>(double v) { return v; }

}  // namespace cpu
}  // namespace tf_fastattn
