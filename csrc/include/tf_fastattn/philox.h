// Counter-based dropout mask shared by the CPU and CUDA attention kernels.
//
// Philox4x32 with 10 rounds (Salmon et al., "Parallel random numbers: as easy
// as 1, 2, 3", SC'11). The key is the 64-bit seed; the counter is
// (s / 4, t, n, b) and the four 32-bit words of one call decide the keys
// 4*(s/4) .. 4*(s/4)+3 of row (b, n, t). A key s is kept when its word is
// >= dropout_threshold(rate), i.e. with probability 1 - rate (to 2^-32).
// The backward regenerates the same mask from the same (seed, b, n, t, s), so
// nothing T x S is stored, and any device draws the same mask.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define TFA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TFA_HOST_DEVICE inline
#endif

namespace tf_fastattn {

struct Philox4 {
  uint32_t x[4];
};

// Philox4x32's multipliers and Weyl key increments (also used by the CPU's
// vectorised generator, attention_microkernels.h).
enum : uint32_t {
  kPhiloxM0 = 0xD2511F53u,
  kPhiloxM1 = 0xCD9E8D57u,
  kPhiloxW0 = 0x9E3779B9u,
  kPhiloxW1 = 0xBB67AE85u,
};

TFA_HOST_DEVICE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

// One Philox4x32-10 block for counter (c0, c1, c2, c3) and key (k0, k1).
TFA_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                      uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kPhiloxM0, c0, &hi0, &lo0);
    philox_mulhilo(kPhiloxM1, c2, &hi1, &lo1);
    uint32_t n0 = hi1 ^ c1 ^ k0;
    uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  Philox4 r;
  r.x[0] = c0;
  r.x[1] = c1;
  r.x[2] = c2;
  r.x[3] = c3;
  return r;
}

// The random words for keys 4*s4 .. 4*s4+3 of attention row (b, n, t).
TFA_HOST_DEVICE Philox4 dropout_words(uint64_t seed, uint32_t b, uint32_t n, uint32_t t, uint32_t s4) {
  return philox4x32_10(s4, t, n, b, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Words below this value are dropped. rate in [0, 1).
TFA_HOST_DEVICE uint32_t dropout_threshold(double rate) {
  double t = rate * 4294967296.0;
  return t >= 4294967295.0 ? 4294967295u : static_cast<uint32_t>(t);
}

// Whether key s of row (b, n, t) is kept (recomputes one Philox block; kernels
// that walk s in order should call dropout_words once per 4 keys instead).
TFA_HOST_DEVICE bool dropout_keep(uint64_t seed, uint32_t threshold, uint32_t b, uint32_t n, uint32_t t,
                                  uint32_t s) {
  Philox4 w = dropout_words(seed, b, n, t, s >> 2);
  return w.x[s & 3] >= threshold;
}

}  // namespace tf_fastattn
