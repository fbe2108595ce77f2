// Attention without tensor cores: float32 arithmetic on CUDA cores, for
// sm_60/sm_70/sm_75 and for float32 inputs on every architecture (and on any
// GPU when forced, as a cross-check of the tensor-core family).
//
// Compiled per (dtype, head-dim bucket, direction):
//   -DTFA_DTYPE=<id> -DTFA_HEAD_DIM=<32|64|128|256> -DTFA_BACKWARD=<0|1>
// Math and conventions: tf_fastattn/attention.h. Logits live in the log2
// domain (x = q.k * scale * log2 e) so every exponential is one exp2f.
//
// Thread layout of the row-block kernels (forward, dQ): 128 threads = 16 row
// groups (ty) x 8 lanes (tx). A thread owns rows ty + 16 i and, per key tile,
// the 4 consecutive keys 4 tx .. 4 tx + 3 (one Philox draw covers them), and
// the output columns tx + 8 c. The 8 lanes of a row are consecutive lanes of
// one warp, so row reductions are 3 shuffles.
//
// Causal and windows: key tiles outside the rows' band (past the last query
// row's diagonal, outside the window) are never loaded. The only exception is
// a row with no allowed key at all (possible with a boolean mask), whose
// output is the uniform average over all S keys (Keras' semantics): such rows
// take a separate pass over V.
#include "attention_args.h"
#include "attention_common.cuh"
#include "common.cuh"
#include "tf_fastattn/philox.h"

namespace tfa {
namespace {

using T = TypeOf<TFA_DTYPE>::type;
constexpr int kHp = TFA_HEAD_DIM;  // head-dim bucket: max(H, Hv) <= kHp
constexpr int kHc = simt_chunk(kHp);
constexpr int kTX = 8, kTY = 16;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

static_assert(kTX * kTY == kSimtThreads, "thread layout");
static_assert(kSimtKeyTile == 4 * kTX, "each lane owns 4 consecutive keys");

// Loads a [kRows, kCols] tile of T (row stride ld elements) into shared
// float32 [kRows][sld], zero outside rows_valid x cols_valid.
template <int kRows, int kCols>
__device__ __forceinline__ void load_tile(float* dst, int sld, const T* src, int64_t ld, int64_t rows_valid,
                                          int64_t cols_valid) {
  for (int i = threadIdx.x; i < kRows * kCols; i += kSimtThreads) {
    const int r = i / kCols, c = i % kCols;
    dst[r * sld + c] = (r < rows_valid && c < cols_valid) ? to_acc(src[r * ld + c]) : 0.f;
  }
}

// mask && causal && in range.
__device__ __forceinline__ float keep_factor(const AttentionParams& a, bool keep) { return keep ? a.inv_keep : 0.f; }

struct Coords {
  int64_t b, n, hk;
};

#if !TFA_BACKWARD

constexpr int kBM = kSimtRowTile, kBN = kSimtKeyTile, kRM = kBM / kTY, kOC = kHp / kTX;

// o_acc[i][c] += sum_s p_s[row_i][s] v[s0 + s][tx + 8 c] over one key tile,
// V read in head-dim chunks through kv_s.
__device__ __forceinline__ void accumulate_pv(const AttentionParams& a, const Coords& co, int64_t s0,
                                              float (*p_s)[kBN + 1], float (*kv_s)[kHc + 1],
                                              float (&o_acc)[kRM][kOC]) {
  const tf_fastattn::AttentionShape& sh = a.shape;
  const int tx = threadIdx.x % kTX, ty = threadIdx.x / kTX;
  const T* v = static_cast<const T*>(a.v) + a.v_strides.offset(co.b, s0, co.hk);
#pragma unroll
  for (int hc = 0; hc < kHp; hc += kHc) {
    if (hc >= sh.head_dim_v) break;
    __syncthreads();  // kv_s and p_s: previous readers done / writers done
    load_tile<kBN, kHc>(&kv_s[0][0], kHc + 1, v + hc, a.v_strides.seq, sh.seqlen_k - s0,
                        sh.head_dim_v - hc);
    __syncthreads();
    for (int s = 0; s < kBN; ++s) {
      float p[kRM];
#pragma unroll
      for (int i = 0; i < kRM; ++i) p[i] = p_s[ty + kTY * i][s];
#pragma unroll
      for (int j = 0; j < kHc / kTX; ++j) {
        const float vv = kv_s[s][tx + kTX * j];
#pragma unroll
        for (int i = 0; i < kRM; ++i) o_acc[i][hc / kTX + j] += p[i] * vv;
      }
    }
  }
}

__device__ void attention_fwd(const AttentionFwdParams& a) {
  const tf_fastattn::AttentionShape& sh = a.shape;
  __shared__ float q_s[kBM][kHp + 1];  // +1: rows of a warp's 4 row groups hit distinct banks
  __shared__ float kv_s[kBN][kHc + 1];
  __shared__ float p_s[kBM][kBN + 1];
  const int tx = threadIdx.x % kTX, ty = threadIdx.x / kTX;
  const int64_t tiles = (sh.seqlen_q + kBM - 1) / kBM;
  // Longest causal tiles first: they start first and the short ones fill in.
  const int64_t tile = tiles - 1 - blockIdx.x % tiles;
  const int64_t bn = blockIdx.x / tiles;
  Coords co;
  co.n = bn % sh.num_heads;
  co.b = bn / sh.num_heads;
  co.hk = co.n / (sh.num_heads / sh.num_heads_kv);
  const int64_t t0 = tile * kBM;
  const int64_t rows = sh.seqlen_q - t0 < kBM ? sh.seqlen_q - t0 : kBM;

  load_tile<kBM, kHp>(&q_s[0][0], kHp + 1,
                      static_cast<const T*>(a.q) + a.q_strides.offset(co.b, t0, co.n), a.q_strides.seq, rows,
                      sh.head_dim);
  float o_acc[kRM][kOC], m[kRM], l[kRM];
#pragma unroll
  for (int i = 0; i < kRM; ++i) {
    m[i] = -inf_f32();
    l[i] = 0.f;
#pragma unroll
    for (int c = 0; c < kOC; ++c) o_acc[i][c] = 0.f;
  }
  const T* k = static_cast<const T*>(a.k) + a.k_strides.offset(co.b, 0, co.hk);
  // Only the key tiles the block's band reaches (causal, window, offset).
  const Band band = band_of(a);
  const int64_t s_end = band_key_end(band, t0, rows, sh.seqlen_k);
  for (int64_t s0 = band_key_begin(band, t0) / kBN * kBN; s0 < s_end; s0 += kBN) {
    float x[kRM][4];
#pragma unroll
    for (int i = 0; i < kRM; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) x[i][e] = 0.f;
    }
#pragma unroll
    for (int hc = 0; hc < kHp; hc += kHc) {
      if (hc >= sh.head_dim) break;
      __syncthreads();
      const int64_t ld_k = a.k_strides.seq;
      load_tile<kBN, kHc>(&kv_s[0][0], kHc + 1, k + s0 * ld_k + hc, ld_k, sh.seqlen_k - s0, sh.head_dim - hc);
      __syncthreads();
      // Each chunk of kHc (<= 64) terms summed from 0, then added into x: one
      // chain over head dim 256 rounded at the running sum's magnitude (the CPU
      // kernels' gemm chunks, attention_microkernels.h).
      float part[kRM][4];
#pragma unroll
      for (int i = 0; i < kRM; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) part[i][e] = 0.f;
      }
      for (int h = 0; h < kHc; ++h) {
        float kk[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) kk[e] = kv_s[4 * tx + e][h];
#pragma unroll
        for (int i = 0; i < kRM; ++i) {
          const float qq = q_s[ty + kTY * i][hc + h];
#pragma unroll
          for (int e = 0; e < 4; ++e) part[i][e] += qq * kk[e];
        }
      }
#pragma unroll
      for (int i = 0; i < kRM; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) x[i][e] += part[i][e];
      }
    }
    // Online softmax (running max m and sum l, both without dropout).
#pragma unroll
    for (int i = 0; i < kRM; ++i) {
      const int64_t t = t0 + ty + kTY * i;
      float mx = -inf_f32();
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool ok = allowed(a, band, co.b, co.n, t, s0 + 4 * tx + e);
        x[i][e] = ok ? logit2(a, x[i][e]).x2 : -inf_f32();
        mx = fmaxf(mx, max_term(ok, x[i][e]));
      }
      const float m_new = fmaxf(m[i], lanes_max(mx, kTX));
      float p[4], sum = 0.f;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        p[e] = m_new == -inf_f32() ? 0.f : exp2f(x[i][e] - m_new);
        sum += p[e];
      }
      const float alpha = m_new == -inf_f32() ? 1.f : exp2f(m[i] - m_new);  // exp2(-inf) = 0
      l[i] = l[i] * alpha + lanes_sum(sum, kTX);
      m[i] = m_new;
#pragma unroll
      for (int c = 0; c < kOC; ++c) o_acc[i][c] *= alpha;
      if (a.has_dropout && t < sh.seqlen_q) {
        const tf_fastattn::Philox4 w = tf_fastattn::dropout_words(dropout_seed(a), uint32_t(co.b), uint32_t(co.n), uint32_t(t),
                                                                  uint32_t(s0 / 4 + tx));
#pragma unroll
        for (int e = 0; e < 4; ++e) p[e] *= keep_factor(a, w.x[e] >= a.dropout_threshold);
      }
      __syncthreads();  // previous tile's readers of p_s are done (first use below)
#pragma unroll
      for (int e = 0; e < 4; ++e) p_s[ty + kTY * i][4 * tx + e] = p[e];
    }
    accumulate_pv(a, co, s0, p_s, kv_s, o_acc);
  }

  // Rows with no allowed key: uniform weights 1/S over every key (dropout
  // applied), a pass over all of V that only such rows need.
  bool empty_row = false;
#pragma unroll
  for (int i = 0; i < kRM; ++i) empty_row |= (ty + kTY * i < rows) && l[i] == 0.f;
  if (__syncthreads_or(empty_row)) {
    const float uniform = sh.seqlen_k ? 1.f / float(sh.seqlen_k) : 0.f;
    for (int64_t s0 = 0; s0 < sh.seqlen_k; s0 += kBN) {
#pragma unroll
      for (int i = 0; i < kRM; ++i) {
        const int64_t t = t0 + ty + kTY * i;
        float p[4];
        tf_fastattn::Philox4 w;
        if (a.has_dropout && t < sh.seqlen_q) {
          w = tf_fastattn::dropout_words(dropout_seed(a), uint32_t(co.b), uint32_t(co.n), uint32_t(t), uint32_t(s0 / 4 + tx));
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool use = t < sh.seqlen_q && l[i] == 0.f && s0 + 4 * tx + e < sh.seqlen_k;
          p[e] = use ? uniform * (a.has_dropout ? keep_factor(a, w.x[e] >= a.dropout_threshold) : 1.f) : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int e = 0; e < 4; ++e) p_s[ty + kTY * i][4 * tx + e] = p[e];
      }
      accumulate_pv(a, co, s0, p_s, kv_s, o_acc);
    }
  }

#pragma unroll
  for (int i = 0; i < kRM; ++i) {
    const int64_t t = t0 + ty + kTY * i;
    if (t >= sh.seqlen_q) continue;
    if (l[i] == 0.f && m[i] != -inf_f32()) l[i] = nan_f32();  // every allowed logit -inf: o and lse NaN
    const float inv = l[i] != 0.f ? 1.f / l[i] : 1.f;  // l NaN: a NaN row
    T* o = static_cast<T*>(a.o) + a.o_strides.offset(co.b, t, co.n);
#pragma unroll
    for (int c = 0; c < kOC; ++c) {
      const int h = tx + kTX * c;
      if (h < sh.head_dim_v) o[h] = from_acc<T>(o_acc[i][c] * inv);
    }
    if (tx == 0) {
      static_cast<float*>(a.lse)[(co.b * sh.num_heads + co.n) * sh.seqlen_q + t] =
          l[i] != 0.f ? m[i] * kLn2 + logf(l[i]) : inf_f32();
    }
  }
}

#else  // TFA_BACKWARD

// delta[b, n, t] = sum_h dO * O, one warp per row, summed by its first lane in
// exactly the arithmetic of the backward's dp = dO . V (float32 FMAs, head
// dim ascending, in chunks of kHc each summed from 0 and then added): in a row with one allowed key O equals that key's V, so
// dp - delta is exactly 0 and so are that row's dq and dS, as in exact
// arithmetic. (A float64 delta rounded to float32 left dp's own rounding:
// dq up to 5e-6 against a criterion floor of 3e-6 in float32, seen when the
// GPU tests ran under the emulator; a float32 butterfly sum before it, ~1e-6
// at Hv = 256.)
__device__ void attention_bwd_delta(const AttentionBwdParams& a) {
  const tf_fastattn::AttentionShape& sh = a.shape;
  const int64_t row = int64_t(blockIdx.x) * (kSimtThreads / 32) + threadIdx.x / 32;  // (b, t, n) flattened
  if (row >= sh.batch * sh.seqlen_q * sh.num_heads || threadIdx.x % 32 != 0) return;
  const int64_t n = row % sh.num_heads, t = (row / sh.num_heads) % sh.seqlen_q;
  const int64_t b = row / (sh.num_heads * sh.seqlen_q);
  const T* o = static_cast<const T*>(a.o) + a.o_strides.offset(b, t, n);
  const T* d_o = static_cast<const T*>(a.do_) + a.do_strides.offset(b, t, n);
  float sum = 0.f;
  for (int64_t h0 = 0; h0 < sh.head_dim_v; h0 += kHc) {  // dp's chunks of kHc
    float part = 0.f;
    for (int64_t h = h0; h < sh.head_dim_v && h < h0 + kHc; ++h) part = fmaf(to_acc(d_o[h]), to_acc(o[h]), part);
    sum += part;
  }
  delta_of(a)[(b * sh.num_heads + n) * sh.seqlen_q + t] = sum;
}

// Probability and its logit gradient for one (t, s), with lse and delta of
// row t. Rows with lse = +inf (no allowed key) have p = 1/S and ds = 0.
struct ProbGrad {
  float p_drop;  // p * keep / (1 - rate)
  float ds;      // p * (dp * keep / (1 - rate) - delta)
};
__device__ __forceinline__ ProbGrad prob_grad(const AttentionBwdParams& a, const Band& band, int64_t b, int64_t n,
                                              int64_t t, int64_t s, float qk, float dp, float lse, float delta,
                                              float dfac) {
  const tf_fastattn::AttentionShape& sh = a.shape;
  ProbGrad r{0.f, 0.f};
  if (t >= sh.seqlen_q || s >= sh.seqlen_k) return r;
  if (lse == inf_f32()) {
    r.p_drop = dfac / float(sh.seqlen_k);
    return r;
  }
  if (!allowed(a, band, b, n, t, s)) return r;
  const Logit x = logit2(a, qk);
  const float p = exp2f(x.x2 - lse * kLog2e);
  r.p_drop = p * dfac;
  r.ds = p * (dp * dfac - delta) * x.grad;
  return r;
}

__device__ __forceinline__ float dropout_factor(const AttentionParams& a, int64_t b, int64_t n, int64_t t, int64_t s) {
  const tf_fastattn::AttentionShape& sh = a.shape;
  if (!a.has_dropout || t >= sh.seqlen_q || s >= sh.seqlen_k) return 1.f;
  return keep_factor(a, tf_fastattn::dropout_keep(dropout_seed(a), a.dropout_threshold, uint32_t(b), uint32_t(n), uint32_t(t),
                                                  uint32_t(s)));
}

// ---- dQ: row blocks, loops over key tiles up to the causal limit ----------
constexpr int kQM = simt_dq_rows(kHp), kQRM = kQM / kTY, kQC = kHp / kTX, kBN = kSimtKeyTile;

__device__ void attention_bwd_dq(const AttentionBwdParams& a) {
  const tf_fastattn::AttentionShape& sh = a.shape;
  __shared__ float q_s[kQM][kHp + 1];
  __shared__ float do_s[kQM][kHp + 1];
  __shared__ float kv_s[kBN][kHc + 1];
  __shared__ float ds_s[kQM][kBN + 1];
  const int tx = threadIdx.x % kTX, ty = threadIdx.x / kTX;
  const int64_t tiles = (sh.seqlen_q + kQM - 1) / kQM;
  const int64_t tile = tiles - 1 - blockIdx.x % tiles;
  const int64_t bn = blockIdx.x / tiles;
  const int64_t n = bn % sh.num_heads, b = bn / sh.num_heads, hk = n / (sh.num_heads / sh.num_heads_kv);
  const int64_t t0 = tile * kQM;
  const int64_t rows = sh.seqlen_q - t0 < kQM ? sh.seqlen_q - t0 : kQM;
  load_tile<kQM, kHp>(&q_s[0][0], kHp + 1, static_cast<const T*>(a.q) + a.q_strides.offset(b, t0, n),
                      a.q_strides.seq, rows, sh.head_dim);
  load_tile<kQM, kHp>(&do_s[0][0], kHp + 1, static_cast<const T*>(a.do_) + a.do_strides.offset(b, t0, n),
                      a.do_strides.seq, rows, sh.head_dim_v);
  float lse[kQRM], delta[kQRM], dq[kQRM][kQC];
#pragma unroll
  for (int i = 0; i < kQRM; ++i) {
    const int64_t t = t0 + ty + kTY * i;
    const int64_t at = (b * sh.num_heads + n) * sh.seqlen_q + t;
    lse[i] = t < sh.seqlen_q ? static_cast<const float*>(a.lse)[at] : inf_f32();
    delta[i] = t < sh.seqlen_q ? delta_of(a)[at] : 0.f;
#pragma unroll
    for (int c = 0; c < kQC; ++c) dq[i][c] = 0.f;
  }
  const T* k = static_cast<const T*>(a.k) + a.k_strides.offset(b, 0, hk);
  const T* v = static_cast<const T*>(a.v) + a.v_strides.offset(b, 0, hk);
  const int64_t ld_k = a.k_strides.seq, ld_v = a.v_strides.seq;
  const Band band = band_of(a);
  const int64_t s_end = band_key_end(band, t0, rows, sh.seqlen_k);
  for (int64_t s0 = band_key_begin(band, t0) / kBN * kBN; s0 < s_end; s0 += kBN) {
    float qk[kQRM][4], dp[kQRM][4];
#pragma unroll
    for (int i = 0; i < kQRM; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) qk[i][e] = dp[i][e] = 0.f;
    }
    // qk = Q K^T and dp = dO V^T, head dim in chunks.
#pragma unroll
    for (int pass = 0; pass < 2; ++pass) {
      const T* src = pass == 0 ? k : v;
      const int64_t hd = pass == 0 ? sh.head_dim : sh.head_dim_v;
      float(*lhs)[kHp + 1] = pass == 0 ? q_s : do_s;
#pragma unroll
      for (int hc = 0; hc < kHp; hc += kHc) {
        if (hc >= hd) break;
        __syncthreads();
        load_tile<kBN, kHc>(&kv_s[0][0], kHc + 1, src + s0 * (pass == 0 ? ld_k : ld_v) + hc,
                            pass == 0 ? ld_k : ld_v, sh.seqlen_k - s0, hd - hc);
        __syncthreads();
        float part[kQRM][4];  // chunk sums, as the forward's
#pragma unroll
        for (int i = 0; i < kQRM; ++i) {
#pragma unroll
          for (int e = 0; e < 4; ++e) part[i][e] = 0.f;
        }
        for (int h = 0; h < kHc; ++h) {
          float kk[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) kk[e] = kv_s[4 * tx + e][h];
#pragma unroll
          for (int i = 0; i < kQRM; ++i) {
            const float l = lhs[ty + kTY * i][hc + h];
#pragma unroll
            for (int e = 0; e < 4; ++e) part[i][e] = fmaf(l, kk[e], part[i][e]);
          }
        }
#pragma unroll
        for (int i = 0; i < kQRM; ++i) {
#pragma unroll
          for (int e = 0; e < 4; ++e) (pass == 0 ? qk : dp)[i][e] += part[i][e];
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kQRM; ++i) {
      const int64_t t = t0 + ty + kTY * i;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t s = s0 + 4 * tx + e;
        ds_s[ty + kTY * i][4 * tx + e] =
            prob_grad(a, band, b, n, t, s, qk[i][e], dp[i][e], lse[i], delta[i], dropout_factor(a, b, n, t, s)).ds;
      }
    }
    // dq += ds K, K re-read in chunks.
#pragma unroll
    for (int hc = 0; hc < kHp; hc += kHc) {
      if (hc >= sh.head_dim) break;
      __syncthreads();
      load_tile<kBN, kHc>(&kv_s[0][0], kHc + 1, k + s0 * ld_k + hc, ld_k, sh.seqlen_k - s0, sh.head_dim - hc);
      __syncthreads();
      for (int s = 0; s < kBN; ++s) {
        float d[kQRM];
#pragma unroll
        for (int i = 0; i < kQRM; ++i) d[i] = ds_s[ty + kTY * i][s];
#pragma unroll
        for (int j = 0; j < kHc / kTX; ++j) {
          const float kk = kv_s[s][tx + kTX * j];
#pragma unroll
          for (int i = 0; i < kQRM; ++i) dq[i][hc / kTX + j] += d[i] * kk;
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kQRM; ++i) {
    const int64_t t = t0 + ty + kTY * i;
    if (t >= sh.seqlen_q) continue;
    T* out = static_cast<T*>(a.dq) + a.dq_strides.offset(b, t, n);
#pragma unroll
    for (int c = 0; c < kQC; ++c) {
      const int h = tx + kTX * c;
      if (h < sh.head_dim) out[h] = from_acc<T>(dq[i][c] * a.scale_f32);
    }
  }
}

// ---- dK, dV: key blocks, loop over the query heads of the kv head's group
// and over query tiles; each block owns its keys' dK/dV (no atomics). ------
constexpr int kKN = simt_dkdv_keys(kHp);         // keys per block
constexpr int kKX = kSimtThreads / kKN;          // lanes per key row
constexpr int kKM = 32;                          // query rows per step
constexpr int kKI = kKM / kKX, kKC = kHp / kKX;  // query columns, dK/dV columns per thread

__device__ void attention_bwd_dkdv(const AttentionBwdParams& a) {
  const tf_fastattn::AttentionShape& sh = a.shape;
  __shared__ float k_s[kKN][kHp + 1];
  __shared__ float v_s[kKN][kHp + 1];
  __shared__ float q_s[kKM][kHc + 1];
  __shared__ float do_s[kKM][kHc + 1];
  __shared__ float p_s[kKN][kKM + 1];
  __shared__ float ds_s[kKN][kKM + 1];
  __shared__ float lse_s[kKM], delta_s[kKM];
  const int tx = threadIdx.x % kKX, j = threadIdx.x / kKX;
  const int64_t tiles = (sh.seqlen_k + kKN - 1) / kKN;
  const int64_t tile = blockIdx.x % tiles;
  const int64_t bh = blockIdx.x / tiles;
  const int64_t hk = bh % sh.num_heads_kv, b = bh / sh.num_heads_kv;
  const int64_t s0 = tile * kKN;
  const int64_t keys = sh.seqlen_k - s0 < kKN ? sh.seqlen_k - s0 : kKN;
  load_tile<kKN, kHp>(&k_s[0][0], kHp + 1, static_cast<const T*>(a.k) + a.k_strides.offset(b, s0, hk),
                      a.k_strides.seq, keys, sh.head_dim);
  load_tile<kKN, kHp>(&v_s[0][0], kHp + 1, static_cast<const T*>(a.v) + a.v_strides.offset(b, s0, hk),
                      a.v_strides.seq, keys, sh.head_dim_v);
  float dk[kKC], dv[kKC];
#pragma unroll
  for (int c = 0; c < kKC; ++c) dk[c] = dv[c] = 0.f;
  const int64_t group = sh.num_heads / sh.num_heads_kv;
  const int64_t s = s0 + j;
  // The query tiles whose band reaches these keys; all of them when a row
  // may have no allowed key (it reaches every key's dV).
  const Band band = band_of(a);
  const bool all_rows = may_have_empty_rows(a, band);
  const int64_t t_begin = all_rows ? 0 : band_query_begin(band, s0) / kKM * kKM;
  const int64_t t_end = all_rows ? sh.seqlen_q : band_query_end(band, s0, keys, sh.seqlen_q);
  for (int64_t n = hk * group; n < (hk + 1) * group; ++n) {
    const T* q = static_cast<const T*>(a.q) + a.q_strides.offset(b, 0, n);
    const T* d_o = static_cast<const T*>(a.do_) + a.do_strides.offset(b, 0, n);
    const int64_t ld_q = a.q_strides.seq, ld_o = a.do_strides.seq;
    for (int64_t t0 = t_begin; t0 < t_end; t0 += kKM) {
      const int64_t rows = sh.seqlen_q - t0 < kKM ? sh.seqlen_q - t0 : kKM;
      __syncthreads();  // lse_s, p_s, ds_s, q_s, do_s of the previous step are consumed
      if (threadIdx.x < kKM) {
        const int64_t t = t0 + threadIdx.x;
        const int64_t at = (b * sh.num_heads + n) * sh.seqlen_q + t;
        lse_s[threadIdx.x] = t < sh.seqlen_q ? static_cast<const float*>(a.lse)[at] : 0.f;
        delta_s[threadIdx.x] = t < sh.seqlen_q ? delta_of(a)[at] : 0.f;
      }
      // A tile wholly outside the band (above the causal diagonal, outside
      // the window) matters only for rows with no allowed key (uniform p):
      // skip it, unloaded, when it has none.
      const bool above = s0 + keys - 1 - t0 < band.lo || s0 - (t0 + rows - 1) > band.hi;
      const float* lse_rows = static_cast<const float*>(a.lse) + (b * sh.num_heads + n) * sh.seqlen_q + t0;
      const bool has_empty = threadIdx.x < rows && lse_rows[threadIdx.x] == inf_f32();
      if (__syncthreads_or(above && has_empty) == 0 && above) continue;

      float qk[kKI], dp[kKI];
#pragma unroll
      for (int i = 0; i < kKI; ++i) qk[i] = dp[i] = 0.f;
#pragma unroll
      for (int hc = 0; hc < kHp; hc += kHc) {
        if (hc >= sh.head_dim && hc >= sh.head_dim_v) break;
        __syncthreads();
        load_tile<kKM, kHc>(&q_s[0][0], kHc + 1, q + t0 * ld_q + hc, ld_q, rows, sh.head_dim - hc);
        load_tile<kKM, kHc>(&do_s[0][0], kHc + 1, d_o + t0 * ld_o + hc, ld_o, rows, sh.head_dim_v - hc);
        __syncthreads();
        float qk_part[kKI], dp_part[kKI];  // chunk sums, as the forward's
#pragma unroll
        for (int i = 0; i < kKI; ++i) qk_part[i] = dp_part[i] = 0.f;
        for (int h = 0; h < kHc; ++h) {
          const float kk = k_s[j][hc + h], vv = v_s[j][hc + h];
#pragma unroll
          for (int i = 0; i < kKI; ++i) {
            qk_part[i] = fmaf(kk, q_s[tx + kKX * i][h], qk_part[i]);
            dp_part[i] = fmaf(vv, do_s[tx + kKX * i][h], dp_part[i]);
          }
        }
#pragma unroll
        for (int i = 0; i < kKI; ++i) {
          qk[i] += qk_part[i];
          dp[i] += dp_part[i];
        }
      }
#pragma unroll
      for (int i = 0; i < kKI; ++i) {
        const int r = tx + kKX * i;
        const int64_t t = t0 + r;
        const ProbGrad g =
            prob_grad(a, band, b, n, t, s, qk[i], dp[i], lse_s[r], delta_s[r], dropout_factor(a, b, n, t, s));
        p_s[j][r] = g.p_drop;
        ds_s[j][r] = g.ds;
      }
      // dv += p_drop^T dO, dk += ds^T Q; Q and dO re-read in chunks unless
      // the whole head dim was one chunk (still in shared memory).
#pragma unroll
      for (int hc = 0; hc < kHp; hc += kHc) {
        if (hc >= sh.head_dim && hc >= sh.head_dim_v) break;
        __syncthreads();
        if (kHc < kHp) {
          load_tile<kKM, kHc>(&q_s[0][0], kHc + 1, q + t0 * ld_q + hc, ld_q, rows, sh.head_dim - hc);
          load_tile<kKM, kHc>(&do_s[0][0], kHc + 1, d_o + t0 * ld_o + hc, ld_o, rows, sh.head_dim_v - hc);
          __syncthreads();
        }
        for (int r = 0; r < kKM; ++r) {
          const float p = p_s[j][r], d = ds_s[j][r];
#pragma unroll
          for (int c = 0; c < kHc / kKX; ++c) {
            dv[hc / kKX + c] += p * do_s[r][tx + kKX * c];
            dk[hc / kKX + c] += d * q_s[r][tx + kKX * c];
          }
        }
      }
    }
  }
  if (s >= sh.seqlen_k) return;
  T* dk_out = static_cast<T*>(a.dk) + a.dk_strides.offset(b, s, hk);
  T* dv_out = static_cast<T*>(a.dv) + a.dv_strides.offset(b, s, hk);
#pragma unroll
  for (int c = 0; c < kKC; ++c) {
    const int h = tx + kKX * c;
    if (h < sh.head_dim) dk_out[h] = from_acc<T>(dk[c] * a.scale_f32);
    if (h < sh.head_dim_v) dv_out[h] = from_acc<T>(dv[c]);
  }
}

#endif  // TFA_BACKWARD

}  // namespace
}  // namespace tfa

#if !TFA_BACKWARD
extern "C" __global__ void __launch_bounds__(tfa::kSimtThreads) tfa_attention_simt_fwd(tfa::AttentionFwdParams a) {
  tfa::attention_fwd(a);
}
#else
extern "C" __global__ void __launch_bounds__(tfa::kSimtThreads)
    tfa_attention_simt_bwd_delta(tfa::AttentionBwdParams a) {
  tfa::attention_bwd_delta(a);
}
extern "C" __global__ void __launch_bounds__(tfa::kSimtThreads) tfa_attention_simt_bwd_dq(tfa::AttentionBwdParams a) {
  tfa::attention_bwd_dq(a);
}
extern "C" __global__ void __launch_bounds__(tfa::kSimtThreads) tfa_attention_simt_bwd_dkdv(tfa::AttentionBwdParams a) {
  tfa::attention_bwd_dkdv(a);
}
#endif
