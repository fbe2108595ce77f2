// Attention backward on tensor cores: mma.sync.m16n8k16 with float16 or
// bfloat16 inputs and float32 accumulation, for sm_80 and newer.
//
// Status: compiled with NVRTC 12 for sm_80..sm_90 in CI, NOT yet run on a GPU.
//
// Compiled per (dtype, head-dim bucket): -DTFA_DTYPE=<0|1> -DTFA_HEAD_DIM=<32..256>
// -DTFA_BACKWARD=1. Same math as the SIMT backward (attention_simt.cu) and
// tf_fastattn/attention.h, split the same way, with no floating-point atomics:
//
//   tfa_attention_mma_bwd_delta  delta[b,n,t] = rowsum(dO * O), exact 16-bit
//                                products summed in float64, stored float32
//   tfa_attention_mma_bwd_dq     one block per (b, n, 64 query rows); loops over
//                                key tiles up to the causal limit:
//                                S = Q K^T, dP = dO V^T, dS, dQ += dS K
//   tfa_attention_mma_bwd_dkdv   one block per (b, kv head, 64 keys); loops
//                                over the query heads of the group and over
//                                query tiles: S^T = K Q^T, dP^T = V dO^T,
//                                dV += P_drop^T dO, dK += dS^T Q
//
// A row with lse = +inf (no allowed key) has p = 1/S on every key (dropout
// applied) and dS = 0: it reaches dV only. Query tiles wholly outside a key
// block's band (above the causal diagonal, outside the window) are skipped
// unloaded, unless one of their rows has no allowed key and so still reaches
// dV. Soft-capping multiplies dS by 1 - tanh^2 of the capped logit.
//
// Fragment layouts as in attention_mma.cu (lane = 4 g + c). A C-layout tile
// of two adjacent 8-column n-tiles is, register for register, an A fragment
// (FlashAttention-2's register reuse): dS and P^T never touch shared memory.
// B operands whose k index runs over rows of a row-major shared tile (K in
// dS K; Q and dO in dS^T Q and P^T dO) are loaded with ldmatrix.trans, so
// every tile is stored once, untransposed.
//
// Head dim 256: the dK/dV block runs two passes over the query tiles (dV,
// then dK, recomputing S^T) so each pass keeps 128 accumulators per thread,
// not 256.
#include "attention_args.h"
#include "attention_common.cuh"
#include "mma.cuh"
#include "attention_mma_bwd_args.h"
#include "common.cuh"
#include "tf_fastattn/philox.h"

namespace tfa {
namespace {

using T = TypeOf<TFA_DTYPE>::type;
static_assert(TFA_DTYPE == kFloat16 || TFA_DTYPE == kBFloat16, "tensor cores take 16-bit inputs");
constexpr int kHp = TFA_HEAD_DIM;
constexpr int kLd = kHp + 8;  // shared row stride (elements) of every tile
constexpr int kThreads = kMmaBwdThreads;
constexpr int kOT = kHp / 8;  // output n-tiles per warp
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kOT % 2 == 0, "ldmatrix.x4 loads two n-tiles at once");

// B fragments of two adjacent n-tiles (columns col .. col + 15) for k rows
// row0 .. row0 + 15 of a row-major [k][n] shared tile: ldmatrix.x4.trans,
// lane l addresses row row0 + l % 8 + 8 ((l / 8) % 2), column col + 8 (l / 16).
// r[0], r[1]: b0, b1 of n-tile col; r[2], r[3]: of n-tile col + 8.
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const uint16_t* tile, int row0, int col) {
  const int lane = threadIdx.x % 32;
  const uint16_t* p = tile + (row0 + lane % 8 + 8 * ((lane / 8) % 2)) * kLd + col + 8 * (lane / 16);
  ldmatrix_x4_trans(r, p);
}

// A fragment (16 rows x k 16) at column kk of a row-major shared tile.
__device__ __forceinline__ void load_a(uint32_t (&af)[4], const uint16_t* rows16, int kk) {
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  af[0] = ld32(rows16 + g * kLd + kk + 2 * c);
  af[1] = ld32(rows16 + (g + 8) * kLd + kk + 2 * c);
  af[2] = ld32(rows16 + g * kLd + kk + 8 + 2 * c);
  af[3] = ld32(rows16 + (g + 8) * kLd + kk + 8 + 2 * c);
}

// acc[nt] += A(16 x head) B^T for kNT n-tiles of 8 rows of `rows_b` (both
// row-major, k = head dim, head columns below `head` only).
template <int kNT>
__device__ __forceinline__ void gemm_abt(float (&acc)[kNT][4], const uint16_t* rows_a, const uint16_t* rows_b,
                                         int64_t head) {
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
#pragma unroll
  for (int kk = 0; kk < kHp; kk += 16) {
    if (kk >= head) break;
    uint32_t af[4];
    load_a(af, rows_a, kk);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      const uint16_t* row = rows_b + (nt * 8 + g) * kLd + kk + 2 * c;
      mma16816(acc[nt], af, ld32(row), ld32(row + 8));
    }
  }
}

// out[kOT] += X B for X in the C layout of kK / 8 n-tiles (k = its columns)
// and B the row-major shared tile [kK][kLd] (output columns below `head`).
template <int kK>
__device__ __forceinline__ void gemm_cb(float (&out)[kOT][4], const float (&x)[kK / 8][4], const uint16_t* b_tile,
                                        int64_t head) {
#pragma unroll
  for (int ks = 0; ks < kK / 16; ++ks) {
    const uint32_t af[4] = {pack2(x[2 * ks][0], x[2 * ks][1]), pack2(x[2 * ks][2], x[2 * ks][3]),
                            pack2(x[2 * ks + 1][0], x[2 * ks + 1][1]), pack2(x[2 * ks + 1][2], x[2 * ks + 1][3])};
#pragma unroll
    for (int nt = 0; nt < kOT; nt += 2) {
      if (nt * 8 >= head) break;
      uint32_t bf[4];
      ldsm_x4_trans(bf, b_tile, ks * 16, nt * 8);
      mma16816(out[nt], af, bf[0], bf[1]);
      mma16816(out[nt + 1], af, bf[2], bf[3]);
    }
  }
}

// [kRows, kHp] 16-bit tile (global row stride ld) into shared memory (row
// stride kLd), zero outside rows_valid x cols_valid.
template <int kRows>
__device__ __forceinline__ void load_tile(uint16_t* dst, const uint16_t* src, int64_t ld, int64_t rows_valid,
                                          int64_t cols_valid) {
  for (int i = threadIdx.x; i < kRows * kHp; i += kThreads) {
    const int r = i / kHp, c = i % kHp;
    dst[r * kLd + c] = (r < rows_valid && c < cols_valid) ? src[r * ld + c] : uint16_t(0);
  }
}

__device__ __forceinline__ float keep_factor(const AttentionParams& a, uint32_t word) {
  return word >= a.dropout_threshold ? a.inv_keep : 0.f;
}

// ---- delta = rowsum(dO * O) -----------------------------------------------
// One warp per (b, t, n) row. A product of two 16-bit values is exact in
// float32; the sum is kept in float64 (dq is sensitive to delta's rounding),
// reduced in a fixed butterfly order.
__device__ void bwd_delta(const AttentionBwdParams& a) {
  const tf_fastattn::AttentionShape& sh = a.shape;
  const int64_t row = int64_t(blockIdx.x) * kMmaBwdDeltaRows + threadIdx.x / 32;
  if (row >= sh.batch * sh.seqlen_q * sh.num_heads) return;  // warp-uniform
  const int lane = threadIdx.x % 32;
  const int64_t n = row % sh.num_heads, t = (row / sh.num_heads) % sh.seqlen_q;
  const int64_t b = row / (sh.num_heads * sh.seqlen_q);
  const T* o = static_cast<const T*>(a.o) + a.o_strides.offset(b, t, n);
  const T* d_o = static_cast<const T*>(a.do_) + a.do_strides.offset(b, t, n);
  double sum = 0.0;
  for (int64_t h = lane; h < sh.head_dim_v; h += 32) sum += double(to_acc(o[h]) * to_acc(d_o[h]));
  sum = lanes_sum(sum, 32);
  if (lane == 0) {
    delta_of(a)[(b * sh.num_heads + n) * sh.seqlen_q + t] = float(sum);
  }
}

// ---- dQ ---------------------------------------------------------------------
constexpr int kQM = kMmaBwdDqRows;
constexpr int kQN = mma_bwd_dq_keys(kHp);

__device__ void bwd_dq(const AttentionBwdParams& a) {
  const tf_fastattn::AttentionShape& sh = a.shape;
  uint16_t* const smem = dynamic_smem<uint16_t>();
  uint16_t* q_s = smem;              // [kQM][kLd]
  uint16_t* do_s = q_s + kQM * kLd;  // [kQM][kLd]
  uint16_t* k_s = do_s + kQM * kLd;  // [kQN][kLd]
  uint16_t* v_s = k_s + kQN * kLd;   // [kQN][kLd]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int64_t tiles = (sh.seqlen_q + kQM - 1) / kQM;
  const int64_t tile = tiles - 1 - blockIdx.x % tiles;  // longest causal tiles first
  const int64_t bn = blockIdx.x / tiles;
  const int64_t n = bn % sh.num_heads, b = bn / sh.num_heads, hk = n / (sh.num_heads / sh.num_heads_kv);
  const int64_t t0 = tile * kQM;
  const int64_t rows = sh.seqlen_q - t0 < kQM ? sh.seqlen_q - t0 : kQM;
  load_tile<kQM>(q_s, static_cast<const uint16_t*>(a.q) + a.q_strides.offset(b, t0, n), a.q_strides.seq, rows,
                 sh.head_dim);
  load_tile<kQM>(do_s, static_cast<const uint16_t*>(a.do_) + a.do_strides.offset(b, t0, n), a.do_strides.seq, rows,
                 sh.head_dim_v);
  const uint16_t* k = static_cast<const uint16_t*>(a.k) + a.k_strides.offset(b, 0, hk);
  const uint16_t* v = static_cast<const uint16_t*>(a.v) + a.v_strides.offset(b, 0, hk);
  const int64_t ld_k = a.k_strides.seq, ld_v = a.v_strides.seq;

  const int64_t row_t[2] = {t0 + warp * 16 + g, t0 + warp * 16 + g + 8};
  float lse2[2], delta[2];
  bool live[2];  // a real row with at least one allowed key (others: dS = 0)
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t at = (b * sh.num_heads + n) * sh.seqlen_q + row_t[r];
    const float lse = row_t[r] < sh.seqlen_q ? static_cast<const float*>(a.lse)[at] : inf_f32();
    live[r] = lse != inf_f32();
    lse2[r] = lse * kLog2e;
    delta[r] = row_t[r] < sh.seqlen_q ? delta_of(a)[at] : 0.f;
  }
  float dq[kOT][4];
#pragma unroll
  for (int nt = 0; nt < kOT; ++nt) dq[nt][0] = dq[nt][1] = dq[nt][2] = dq[nt][3] = 0.f;
  const uint16_t* qw = q_s + warp * 16 * kLd;
  const uint16_t* dow = do_s + warp * 16 * kLd;

  const Band band = band_of(a);
  const int64_t s_end = band_key_end(band, t0, rows, sh.seqlen_k);
  for (int64_t s0 = band_key_begin(band, t0) / kQN * kQN; s0 < s_end; s0 += kQN) {
    __syncthreads();  // the previous tile's K and V are consumed
    load_tile<kQN>(k_s, k + s0 * ld_k, ld_k, sh.seqlen_k - s0, sh.head_dim);
    load_tile<kQN>(v_s, v + s0 * ld_v, ld_v, sh.seqlen_k - s0, sh.head_dim_v);
    __syncthreads();
    float x[kQN / 8][4], dp[kQN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kQN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) x[nt][e] = dp[nt][e] = 0.f;
    }
    gemm_abt<kQN / 8>(x, qw, k_s, sh.head_dim);
    gemm_abt<kQN / 8>(dp, dow, v_s, sh.head_dim_v);
    // dS = p (dp keep / (1 - rate) - delta), into x.
#pragma unroll
    for (int nt = 0; nt < kQN / 8; ++nt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t s = s0 + nt * 8 + 2 * c;  // this lane's key pair: half of one Philox draw
        tf_fastattn::Philox4 w{};
        if (a.has_dropout && live[r]) {
          w = tf_fastattn::dropout_words(dropout_seed(a), uint32_t(b), uint32_t(n), uint32_t(row_t[r]), uint32_t(s / 4));
        }
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float ds = 0.f;
          if (live[r] && allowed(a, band, b, n, row_t[r], s + e)) {
            const Logit xl = logit2(a, x[nt][2 * r + e]);
            const float p = exp2f(xl.x2 - lse2[r]);
            const float dfac = a.has_dropout ? keep_factor(a, w.x[(s + e) % 4]) : 1.f;
            ds = p * (dp[nt][2 * r + e] * dfac - delta[r]) * xl.grad;
          }
          x[nt][2 * r + e] = ds;
        }
      }
    }
    gemm_cb<kQN>(dq, x, k_s, sh.head_dim);
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t t = row_t[r];
    if (t >= sh.seqlen_q) continue;
    T* out = static_cast<T*>(a.dq) + a.dq_strides.offset(b, t, n);
#pragma unroll
    for (int nt = 0; nt < kOT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int h = nt * 8 + 2 * c + e;
        if (h < sh.head_dim) out[h] = from_acc<T>(dq[nt][2 * r + e] * a.scale_f32);
      }
    }
  }
}

// ---- dK, dV -----------------------------------------------------------------
constexpr int kKN = kMmaBwdKvKeys;
constexpr int kKM = mma_bwd_kv_rows(kHp);
constexpr bool kSplitPasses = kHp > 128;

struct KvTiles {
  uint16_t* k_s;   // [kKN][kLd]
  uint16_t* v_s;   // [kKN][kLd]
  uint16_t* q_s;   // [kKM][kLd]
  uint16_t* do_s;  // [kKM][kLd]
  float* lse_s;    // [kKM]
  float* delta_s;  // [kKM]
};

// One pass over every query head of the group and every query tile,
// accumulating dK (kDk) and/or dV (kDv) of this warp's 16 keys, then writing them.
template <bool kDk, bool kDv>
__device__ void dkdv_pass(const AttentionBwdParams& a, const KvTiles& sm, int64_t b, int64_t hk, int64_t s0,
                          int64_t keys) {
  const tf_fastattn::AttentionShape& sh = a.shape;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  float dk[kDk ? kOT : 2][4], dv[kDv ? kOT : 2][4];
#pragma unroll
  for (int nt = 0; nt < (kDk ? kOT : 2); ++nt) dk[nt][0] = dk[nt][1] = dk[nt][2] = dk[nt][3] = 0.f;
#pragma unroll
  for (int nt = 0; nt < (kDv ? kOT : 2); ++nt) dv[nt][0] = dv[nt][1] = dv[nt][2] = dv[nt][3] = 0.f;
  const uint16_t* kw = sm.k_s + warp * 16 * kLd;
  const uint16_t* vw = sm.v_s + warp * 16 * kLd;
  const int64_t key[2] = {s0 + warp * 16 + g, s0 + warp * 16 + g + 8};
  const int64_t group = sh.num_heads / sh.num_heads_kv;
  const float* lse_g = static_cast<const float*>(a.lse);
  // The query tiles whose band reaches these keys; all of them when a row
  // may have no allowed key (it reaches every key's dV).
  const Band band = band_of(a);
  const bool all_rows = may_have_empty_rows(a, band);
  const int64_t t_begin = all_rows ? 0 : band_query_begin(band, s0) / kKM * kKM;
  const int64_t t_end = all_rows ? sh.seqlen_q : band_query_end(band, s0, keys, sh.seqlen_q);

  for (int64_t n = hk * group; n < (hk + 1) * group; ++n) {
    const int64_t stat0 = (b * sh.num_heads + n) * sh.seqlen_q;
    for (int64_t t0 = t_begin; t0 < t_end; t0 += kKM) {
      const int64_t rows = sh.seqlen_q - t0 < kKM ? sh.seqlen_q - t0 : kKM;
      __syncthreads();  // the previous step's tiles and statistics are consumed
      // A tile wholly outside the band of these keys (above the causal
      // diagonal, outside the window) matters only for rows with no allowed
      // key (uniform p, dV only): skip it, unloaded, when it has none.
      if (s0 + keys - 1 - t0 < band.lo || s0 - (t0 + rows - 1) > band.hi) {
        if constexpr (!kDv) continue;
        const bool empty = threadIdx.x < rows && lse_g[stat0 + t0 + threadIdx.x] == inf_f32();
        if (!__syncthreads_or(empty)) continue;
      }
      if (threadIdx.x < kKM) {
        const int64_t t = t0 + threadIdx.x;
        sm.lse_s[threadIdx.x] = t < sh.seqlen_q ? lse_g[stat0 + t] : 0.f;
        sm.delta_s[threadIdx.x] = t < sh.seqlen_q ? delta_of(a)[stat0 + t] : 0.f;
      }
      // Addressed from the params at each step: kept in registers across
      // the loop they made the head-dim-64 kernel spill.
      load_tile<kKM>(sm.q_s, static_cast<const uint16_t*>(a.q) + a.q_strides.offset(b, t0, n), a.q_strides.seq, rows,
                     sh.head_dim);
      load_tile<kKM>(sm.do_s, static_cast<const uint16_t*>(a.do_) + a.do_strides.offset(b, t0, n), a.do_strides.seq,
                     rows, sh.head_dim_v);
      __syncthreads();
      // S^T = K Q^T and (for dK) dP^T = V dO^T: rows = keys g, g + 8,
      // columns = queries nt * 8 + 2c + e.
      float st[kKM / 8][4], dpt[kKM / 8][4];
#pragma unroll
      for (int nt = 0; nt < kKM / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.f;
      }
      gemm_abt<kKM / 8>(st, kw, sm.q_s, sh.head_dim);
      if constexpr (kDk) gemm_abt<kKM / 8>(dpt, vw, sm.do_s, sh.head_dim_v);
      // st <- p_drop, dpt <- dS. One Philox draw per element: a lane's
      // elements differ in the query row or in the key group of 4.
#pragma unroll
      for (int nt = 0; nt < kKM / 8; ++nt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int tl = nt * 8 + 2 * c + e;
            const int64_t t = t0 + tl, s = key[r];
            float p = 0.f, ds = 0.f;
            if (t < sh.seqlen_q && s < sh.seqlen_k) {
              const float lse = sm.lse_s[tl];
              const bool empty = lse == inf_f32();
              if (empty || allowed(a, band, b, n, t, s)) {
                const float dfac =
                    a.has_dropout ? (tf_fastattn::dropout_keep(dropout_seed(a), a.dropout_threshold, uint32_t(b), uint32_t(n),
                                                           uint32_t(t), uint32_t(s))
                                     ? a.inv_keep
                                     : 0.f)
                              : 1.f;
                if (empty) {
                  p = dfac / float(sh.seqlen_k);
                } else {
                  const Logit xl = logit2(a, st[nt][2 * r + e]);
                  const float pr = exp2f(xl.x2 - lse * kLog2e);
                  p = pr * dfac;
                  ds = pr * (dpt[nt][2 * r + e] * dfac - sm.delta_s[tl]) * xl.grad;
                }
              }
            }
            st[nt][2 * r + e] = p;
            dpt[nt][2 * r + e] = ds;
          }
        }
      }
      if constexpr (kDv) gemm_cb<kKM>(dv, st, sm.do_s, sh.head_dim_v);
      if constexpr (kDk) gemm_cb<kKM>(dk, dpt, sm.q_s, sh.head_dim);
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t s = key[r];
    if (s >= sh.seqlen_k) continue;
    T* dk_out = static_cast<T*>(a.dk) + a.dk_strides.offset(b, s, hk);
    T* dv_out = static_cast<T*>(a.dv) + a.dv_strides.offset(b, s, hk);
#pragma unroll
    for (int nt = 0; nt < kOT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int h = nt * 8 + 2 * c + e;
        if (kDk && h < sh.head_dim) dk_out[h] = from_acc<T>(dk[kDk ? nt : 0][2 * r + e] * a.scale_f32);
        if (kDv && h < sh.head_dim_v) dv_out[h] = from_acc<T>(dv[kDv ? nt : 0][2 * r + e]);
      }
    }
  }
}

__device__ void bwd_dkdv(const AttentionBwdParams& a) {
  const tf_fastattn::AttentionShape& sh = a.shape;
  uint16_t* const smem = dynamic_smem<uint16_t>();
  KvTiles sm;
  sm.k_s = smem;
  sm.v_s = sm.k_s + kKN * kLd;
  sm.q_s = sm.v_s + kKN * kLd;
  sm.do_s = sm.q_s + kKM * kLd;
  sm.lse_s = reinterpret_cast<float*>(sm.do_s + kKM * kLd);
  sm.delta_s = sm.lse_s + kKM;
  const int64_t tiles = (sh.seqlen_k + kKN - 1) / kKN;
  const int64_t tile = blockIdx.x % tiles;
  const int64_t bh = blockIdx.x / tiles;
  const int64_t hk = bh % sh.num_heads_kv, b = bh / sh.num_heads_kv;
  const int64_t s0 = tile * kKN;
  const int64_t keys = sh.seqlen_k - s0 < kKN ? sh.seqlen_k - s0 : kKN;
  load_tile<kKN>(sm.k_s, static_cast<const uint16_t*>(a.k) + a.k_strides.offset(b, s0, hk), a.k_strides.seq, keys,
                 sh.head_dim);
  load_tile<kKN>(sm.v_s, static_cast<const uint16_t*>(a.v) + a.v_strides.offset(b, s0, hk), a.v_strides.seq, keys,
                 sh.head_dim_v);
  // (the first step of a pass syncs before reading k_s / v_s)
  if constexpr (kSplitPasses) {
    dkdv_pass<false, true>(a, sm, b, hk, s0, keys);
    dkdv_pass<true, false>(a, sm, b, hk, s0, keys);
  } else {
    dkdv_pass<true, true>(a, sm, b, hk, s0, keys);
  }
}

}  // namespace
}  // namespace tfa

extern "C" __global__ void __launch_bounds__(tfa::kMmaBwdThreads)
    tfa_attention_mma_bwd_delta(tfa::AttentionBwdParams a) {
  tfa::bwd_delta(a);
}
extern "C" __global__ void __launch_bounds__(tfa::kMmaBwdThreads) tfa_attention_mma_bwd_dq(tfa::AttentionBwdParams a) {
  tfa::bwd_dq(a);
}
extern "C" __global__ void __launch_bounds__(tfa::kMmaBwdThreads)
    tfa_attention_mma_bwd_dkdv(tfa::AttentionBwdParams a) {
  tfa::bwd_dkdv(a);
}
