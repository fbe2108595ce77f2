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

using tf_fastattn::Band;

// The launch's band of keys per query row (causal, window, query offset):
// the params' own, or from the query offset in device memory when the front
// end passed it there (AttentionParams::query_offset_device). Read once per
// block.
__device__ __forceinline__ Band band_of(const AttentionParams& a) {
  if (!a.query_offset_device) return a.band;
  return tf_fastattn::attention_band(a.is_causal, a.window_left, a.window_right, *a.query_offset_device);
}

// Keys [begin, end) that query rows [t0, t0 + rows) may see (within [0, S)),
// and query rows [begin, end) that keys [s0, s0 + keys) may be seen by
// (within [0, T)): the only tiles the passes visit.
__device__ __forceinline__ int64_t band_key_begin(const Band& band, int64_t t0) {
  return t0 + band.lo > 0 ? t0 + band.lo : 0;
}
__device__ __forceinline__ int64_t band_key_end(const Band& band, int64_t t0, int64_t rows, int64_t S) {
  const int64_t e = t0 + rows + band.hi < S ? t0 + rows + band.hi : S;
  return e > 0 ? e : 0;
}
__device__ __forceinline__ int64_t band_query_begin(const Band& band, int64_t s0) {
  return s0 - band.hi > 0 ? s0 - band.hi : 0;
}
__device__ __forceinline__ int64_t band_query_end(const Band& band, int64_t s0, int64_t keys, int64_t T) {
  const int64_t e = s0 + keys - band.lo < T ? s0 + keys - band.lo : T;
  return e > 0 ? e : 0;
}

// Whether some query row may have no allowed key at all (a mask, or rows
// whose band misses [0, S)): such rows average every key uniformly, so the
// dK/dV passes must visit query tiles outside the band for them.
__device__ __forceinline__ bool may_have_empty_rows(const AttentionParams& a, const Band& band) {
  const int64_t T = a.shape.seqlen_q, S = a.shape.seqlen_k;
  return a.mask || S == 0 || T - 1 + band.lo > S - 1 || band.hi < 0;
}

// Whether query t may attend to key s of (b, n): inside the sequence, inside
// the band (the causal diagonal, the window) and allowed by the broadcast
// boolean mask.
__device__ __forceinline__ bool allowed(const AttentionParams& a, const Band& band, int64_t b, int64_t n, int64_t t,
                                        int64_t s) {
  if (t >= a.shape.seqlen_q || s >= a.shape.seqlen_k) return false;
  if (s < t + band.lo || s > t + band.hi) return false;
  const auto& m = a.mask_strides;
  return !a.mask || a.mask[b * m.batch + n * m.head + t * m.row + s * m.col];
}

// What a logit x (allowed or not) adds to its row's running max, so that
// NaN and inf reach the rows they reach in the reference math: a masked key
// -inf; an allowed NaN +inf (fmaxf would drop it; with the max +inf, exp2(x
// - m) of the NaN is NaN and so is the row); an allowed -inf the lowest
// finite float, so that a row whose allowed logits are all -inf ends with
// l = 0 but m > -inf, and is made NaN (-inf - (-inf)) rather than averaged
// as a row with no allowed key. Any other logit itself.
__device__ __forceinline__ float max_term(bool allowed_key, float x) {
  const float inf = __int_as_float(0x7f800000);
  return !allowed_key ? -inf : x != x ? inf : fmaxf(x, -3.402823466e38f);
}

// The logit of a raw dot product qk in the log2 domain (the kernels' exp2),
// soft-capped when the params ask (cap * tanh(scale qk / cap)), and its
// derivative with respect to the uncapped logit (1 - tanh^2; 1 without a
// cap), which multiplies dS in the backward.
struct Logit {
  float x2;    // logit * log2(e)
  float grad;  // d logit / d (scale qk)
};
__device__ __forceinline__ Logit logit2(const AttentionParams& a, float qk) {
  if (!a.has_soft_cap) return Logit{qk * a.scale_log2, 1.f};
  const float t = tanhf(qk * a.scale_f32 / a.soft_cap_f32);
  return Logit{t * a.soft_cap_f32 * 1.4426950408889634f, 1.f - t * t};
}

}  // namespace tfa
