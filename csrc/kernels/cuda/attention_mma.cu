// Attention forward on tensor cores: mma.sync.m16n8k16 with float16 or
// bfloat16 inputs and float32 accumulation, for sm_80 and newer.
//
// Compiled per (dtype, head-dim bucket): -DTFA_DTYPE=<0|1> -DTFA_HEAD_DIM=<32..256>
// -DTFA_BACKWARD=0. Math and conventions: tf_fastattn/attention.h; tile
// shapes and shared-memory layout: attention_args.h.
//
// Data movement (FlashAttention-2's shape): Q, K and V tiles reach shared
// memory by 16-byte cp.async copies (zero fill past the sequence and the head
// dim; a scalar path for rows that are not 16-byte aligned or head dims that
// are not a multiple of 8), K of the next key tile is in flight during this
// tile's softmax and V of the next during the next Q K^T; fragments come from
// ldmatrix (.trans for V, kept row-major); each warp owns two 16-row slabs up
// to head dim 128, so every K and V fragment feeds two MMAs. Tiles inside the
// band and the sequence, without a dense mask, skip the per-score checks. The
// output is staged in shared memory for 16-byte stores.
//
// Fragment layouts (PTX ISA, mma.m16n8k16): lane = 4 g + c (g = group, c =
// thread in group). A (16 x 16, row-major): rows g and g + 8, columns 2c, 2c+1
// and 2c+8, 2c+9. B (16 x 8): k rows 2c, 2c+1 (and +8) of column g.
// C (16 x 8): rows g, g+8, columns 2c, 2c+1. The scores of two adjacent
// 8-key n-tiles are, register for register, the A fragment of P for the next
// product O += P V (FlashAttention-2's register reuse), so P never touches
// shared memory.
#include "attention_args.h"
#include "attention_common.cuh"
#include "mma.cuh"
#include "common.cuh"
#include "tf_fastattn/philox.h"

namespace tfa {
namespace {

using T = TypeOf<TFA_DTYPE>::type;
static_assert(TFA_DTYPE == kFloat16 || TFA_DTYPE == kBFloat16, "tensor cores take 16-bit inputs");
constexpr int kHp = TFA_HEAD_DIM;
constexpr int kSlabs = mma_fwd_slabs(kHp);
constexpr int kBM = mma_fwd_rows(kHp);
constexpr int kBN = mma_key_tile(kHp);
constexpr int kLd = kHp + 8;  // row stride of every tile (elements)
constexpr int kThreads = 32 * kMmaWarps;
constexpr int kOT = kHp / 8;   // output n-tiles per slab
constexpr int kST = kBN / 8;   // score n-tiles per slab
constexpr int kChunks = kHp / 8;  // 16-byte chunks per row
constexpr float kLn2 = 0.6931471805599453f;
static_assert(kBN * kChunks % kThreads == 0 && kBM * kChunks % kThreads == 0, "whole copy rounds per thread");

// Whether rows of `p` (row stride `ld` elements) are 16-byte aligned and the
// columns come in whole 16-byte chunks: the cp.async path.
__device__ __forceinline__ bool rows_aligned16(const void* p, int64_t ld, int64_t cols) {
  return cols % 8 == 0 && ld % 8 == 0 && reinterpret_cast<unsigned long long>(p) % 16 == 0;
}

// [kRows, kHp] 16-bit tile at `src` (row stride ld) into shared memory (row
// stride kLd), zero outside rows_valid x cols: cp.async (the caller commits
// and waits) or, unaligned, element by element.
template <int kRows>
__device__ __forceinline__ void load_tile(uint16_t* dst, const uint16_t* src, int64_t ld, int64_t rows_valid,
                                          int64_t cols, bool vec) {
  if (vec) {
    // Thread i copies chunk i % kChunks of rows i / kChunks + k kRowStep: one
    // running source pointer, no per-row offsets kept across the tile loop.
    static_assert(kThreads % kChunks == 0, "a round of copies covers whole rows");
    constexpr int kRowStep = kThreads / kChunks;
    const int c = threadIdx.x % kChunks, r0 = threadIdx.x / kChunks;
    const bool col_ok = 8 * c < cols;
    const uint16_t* p = src + r0 * ld + 8 * c;
    uint16_t* d = dst + r0 * kLd + 8 * c;
#pragma unroll
    for (int it = 0; it < kRows / kRowStep; ++it) {
      const bool ok = col_ok && r0 + it * kRowStep < rows_valid;
      cp_async16(smem_addr(d), ok ? p : src, ok ? 16 : 0);
      p += kRowStep * ld;
      d += kRowStep * kLd;
    }
  } else {
    for (int i = threadIdx.x; i < kRows * kHp; i += kThreads) {
      const int r = i / kHp, c = i % kHp;
      dst[r * kLd + c] = (r < rows_valid && c < cols) ? src[r * ld + c] : uint16_t(0);
    }
  }
}

// o[j] += P[j] V for one key tile; p[j] holds slab j's P in the C layout of
// kST n-tiles; V row-major [kBN][kLd], B fragments by ldmatrix.trans, each
// feeding kSlabs MMAs.
__device__ __forceinline__ void accumulate_pv(float (&p)[kSlabs][kST][4], const uint16_t* v_s,
                                              float (&o)[kSlabs][kOT][4]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int ks = 0; ks < kBN / 16; ++ks) {
    uint32_t af[kSlabs][4];
#pragma unroll
    for (int j = 0; j < kSlabs; ++j) {
      af[j][0] = pack2(p[j][2 * ks][0], p[j][2 * ks][1]);
      af[j][1] = pack2(p[j][2 * ks][2], p[j][2 * ks][3]);
      af[j][2] = pack2(p[j][2 * ks + 1][0], p[j][2 * ks + 1][1]);
      af[j][3] = pack2(p[j][2 * ks + 1][2], p[j][2 * ks + 1][3]);
    }
    // Lane l addresses row ks*16 + 8 ((l/8) % 2) + l % 8 of V at columns
    // (nt + (l/8) / 2) * 8: matrices (keys 0-7 | 8-15) x (n-tile nt | nt+1).
    const uint16_t* vrow = v_s + (ks * 16 + 8 * ((lane / 8) % 2) + lane % 8) * kLd + 8 * (lane / 16);
#pragma unroll
    for (int nt = 0; nt < kOT; nt += 2) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, vrow + nt * 8);
#pragma unroll
      for (int j = 0; j < kSlabs; ++j) {
        mma16816(o[j][nt], af[j], b[0], b[1]);
        mma16816(o[j][nt + 1], af[j], b[2], b[3]);
      }
    }
  }
}

// x[j] = Q[j] K^T for one key tile (raw dot products): A fragments of the
// warp's slabs and B fragments of two key n-tiles per ldmatrix.x4.
__device__ __forceinline__ void scores(const uint16_t* qw, const uint16_t* k_s, float (&x)[kSlabs][kST][4]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < kSlabs; ++j) {
#pragma unroll
    for (int nt = 0; nt < kST; ++nt) x[j][nt][0] = x[j][nt][1] = x[j][nt][2] = x[j][nt][3] = 0.f;
  }
  // A: lane l addresses row (l % 8) + 8 ((l/8) % 2) of the slab at column 8 (l/16).
  const SmemAddr qrow = smem_addr(qw + (lane % 8 + 8 * ((lane / 8) % 2)) * kLd + 8 * (lane / 16));
  // B: lane l addresses key (l % 8) + 8 (l/16) of the n-tile pair at column 8 ((l/8) % 2).
  const SmemAddr krow = smem_addr(k_s + (lane % 8 + 8 * (lane / 16)) * kLd + 8 * ((lane / 8) % 2));
#pragma unroll
  for (int kk = 0; kk < kHp; kk += 16) {
    uint32_t af[kSlabs][4];
#pragma unroll
    for (int j = 0; j < kSlabs; ++j) ldmatrix_x4(af[j], smem_at(qrow, j * 16 * kLd + kk));
#pragma unroll
    for (int nt = 0; nt < kST; nt += 2) {
      uint32_t b[4];
      ldmatrix_x4(b, smem_at(krow, nt * 8 * kLd + kk));
#pragma unroll
      for (int j = 0; j < kSlabs; ++j) {
        mma16816(x[j][nt], af[j], b[0], b[1]);
        mma16816(x[j][nt + 1], af[j], b[2], b[3]);
      }
    }
  }
}

// Online softmax of one key tile for the warp's rows (slab j, r = 0: row g,
// r = 1: row g + 8): logits in the log2 domain, new row max, rescale of o and
// l, p = exp2(x - m) in place, dropout. kChecked: some score of the tile may
// be disallowed (band edge, sequence end, dense mask); kCap: soft-capped.
template <bool kChecked, bool kCap>
__device__ __forceinline__ void softmax_tile(const AttentionFwdParams& a, const Band& band, int64_t b, int64_t n,
                                             const int64_t (&row_t)[kSlabs][2], int64_t s0, float (&x)[kSlabs][kST][4],
                                             float (&m)[kSlabs][2], float (&l)[kSlabs][2],
                                             float (&o)[kSlabs][kOT][4]) {
  // The fast path (!kChecked && !kCap, a positive scale: the caller's
  // condition) takes the row max of the raw products and folds the scale
  // into one FFMA before ex2: p = 2^(qk scale log2(e) - m).
  constexpr bool kFast = !kChecked && !kCap;
  const int c = threadIdx.x % 4;
#pragma unroll
  for (int j = 0; j < kSlabs; ++j) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -inf_f32();
#pragma unroll
      for (int nt = 0; nt < kST; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& xv = x[j][nt][2 * r + e];
          if (kFast) {
            mx = fmax_nan(mx, xv);  // every score allowed
            continue;
          }
          const bool ok = !kChecked || allowed(a, band, b, n, row_t[j][r], s0 + nt * 8 + 2 * c + e);
          const float logit = kCap ? logit2(a, xv).x2 : xv * a.scale_log2;
          xv = ok ? logit : -inf_f32();
          mx = fmaxf(mx, max_term(ok, logit));
        }
      }
      if (kFast) mx = max_term(true, mx * a.scale_log2);  // NaN -> +inf, -inf -> lowest finite
      const float m_new = fmaxf(m[j][r], lanes_max(mx, 4));
      const bool none = m_new == -inf_f32();
      const float alpha = none ? 1.f : exp2_approx(m[j][r] - m_new);
      const float m_use = none ? 0.f : m_new;  // all -inf so far: p = exp2(-inf) = 0
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kST; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& xv = x[j][nt][2 * r + e];
          xv = exp2_approx(kFast ? fmaf(xv, a.scale_log2, -m_use) : xv - m_use);
          sum += xv;
        }
      }
      l[j][r] = l[j][r] * alpha + lanes_sum(sum, 4);
      m[j][r] = m_new;
#pragma unroll
      for (int nt = 0; nt < kOT; ++nt) {
        o[j][nt][2 * r] *= alpha;
        o[j][nt][2 * r + 1] *= alpha;
      }
      if (a.has_dropout && row_t[j][r] < a.shape.seqlen_q) {
        // A lane's key pair 2c, 2c+1 of an n-tile is half of one Philox draw.
#pragma unroll
        for (int nt = 0; nt < kST; ++nt) {
          const int64_t s = s0 + nt * 8 + 2 * c;
          const tf_fastattn::Philox4 w = tf_fastattn::dropout_words(dropout_seed(a), uint32_t(b), uint32_t(n),
                                                                    uint32_t(row_t[j][r]), uint32_t(s / 4));
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            x[j][nt][2 * r + e] *= w.x[(s + e) % 4] >= a.dropout_threshold ? a.inv_keep : 0.f;
          }
        }
      }
    }
  }
}

__device__ void attention_fwd(const AttentionFwdParams& a) {
  const tf_fastattn::AttentionShape& sh = a.shape;
  uint16_t* const smem = dynamic_smem<uint16_t>();
  uint16_t* const q_s = smem;             // [kBM][kLd]; the output's staging at the end
  uint16_t* const k_s = q_s + kBM * kLd;  // [kBN][kLd]
  uint16_t* const v_s = k_s + kBN * kLd;  // [kBN][kLd]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int64_t tiles = (sh.seqlen_q + kBM - 1) / kBM;
  const int64_t tile = tiles - 1 - blockIdx.x % tiles;  // longest causal tiles first
  const int64_t bn = blockIdx.x / tiles;
  const int64_t n = bn % sh.num_heads, b = bn / sh.num_heads, hk = n / (sh.num_heads / sh.num_heads_kv);
  const int64_t t0 = tile * kBM;
  const int64_t rows = sh.seqlen_q - t0 < kBM ? sh.seqlen_q - t0 : kBM;
  const uint16_t* const q = static_cast<const uint16_t*>(a.q) + a.q_strides.offset(b, t0, n);
  const uint16_t* const k = static_cast<const uint16_t*>(a.k) + a.k_strides.offset(b, 0, hk);
  const uint16_t* const v = static_cast<const uint16_t*>(a.v) + a.v_strides.offset(b, 0, hk);
  const int64_t ld_k = a.k_strides.seq, ld_v = a.v_strides.seq;
  const bool q_vec = rows_aligned16(q, a.q_strides.seq, sh.head_dim);
  const bool k_vec = rows_aligned16(k, ld_k, sh.head_dim), v_vec = rows_aligned16(v, ld_v, sh.head_dim_v);

  float o[kSlabs][kOT][4], m[kSlabs][2], l[kSlabs][2];
  int64_t row_t[kSlabs][2];
#pragma unroll
  for (int j = 0; j < kSlabs; ++j) {
#pragma unroll
    for (int nt = 0; nt < kOT; ++nt) o[j][nt][0] = o[j][nt][1] = o[j][nt][2] = o[j][nt][3] = 0.f;
    m[j][0] = m[j][1] = -inf_f32();
    l[j][0] = l[j][1] = 0.f;
    row_t[j][0] = t0 + (warp * kSlabs + j) * 16 + g;
    row_t[j][1] = row_t[j][0] + 8;
  }
  const uint16_t* const qw = q_s + warp * kSlabs * 16 * kLd;

  // Only the key tiles the block's band reaches (causal, window, offset).
  const Band band = band_of(a);
  const int64_t s_end = band_key_end(band, t0, rows, sh.seqlen_k);
  const int64_t s_begin = band_key_begin(band, t0) / kBN * kBN;
  // Groups in flight: {Q, K(first)} then V(first); each tile commits one K
  // and one V group (empty past the last tile), so wait<1> always means "all
  // but the newest".
  load_tile<kBM>(q_s, q, a.q_strides.seq, rows, sh.head_dim, q_vec);
  if (s_begin < s_end) load_tile<kBN>(k_s, k + s_begin * ld_k, ld_k, sh.seqlen_k - s_begin, sh.head_dim, k_vec);
  cp_async_commit();
  if (s_begin < s_end) load_tile<kBN>(v_s, v + s_begin * ld_v, ld_v, sh.seqlen_k - s_begin, sh.head_dim_v, v_vec);
  cp_async_commit();
  for (int64_t s0 = s_begin; s0 < s_end; s0 += kBN) {
    cp_async_wait<1>();  // Q and this tile's K
    __syncthreads();
    float x[kSlabs][kST][4];
    scores(qw, k_s, x);
    __syncthreads();  // every warp is done with K
    if (s0 + kBN < s_end) {
      load_tile<kBN>(k_s, k + (s0 + kBN) * ld_k, ld_k, sh.seqlen_k - s0 - kBN, sh.head_dim, k_vec);
    }
    cp_async_commit();
    // Per-score checks only where some score may be disallowed.
    const bool checked = a.mask || s0 + kBN > sh.seqlen_k || t0 + kBM - 1 + band.lo > s0 ||
                         s0 + kBN - 1 > t0 + band.hi || !(a.scale_log2 > 0.f);
    if (a.has_soft_cap) {
      if (checked) {
        softmax_tile<true, true>(a, band, b, n, row_t, s0, x, m, l, o);
      } else {
        softmax_tile<false, true>(a, band, b, n, row_t, s0, x, m, l, o);
      }
    } else if (checked) {
      softmax_tile<true, false>(a, band, b, n, row_t, s0, x, m, l, o);
    } else {
      softmax_tile<false, false>(a, band, b, n, row_t, s0, x, m, l, o);
    }
    cp_async_wait<1>();  // this tile's V
    __syncthreads();
    accumulate_pv(x, v_s, o);
    __syncthreads();  // every warp is done with V
    if (s0 + kBN < s_end) {
      load_tile<kBN>(v_s, v + (s0 + kBN) * ld_v, ld_v, sh.seqlen_k - s0 - kBN, sh.head_dim_v, v_vec);
    }
    cp_async_commit();
  }
  cp_async_wait<0>();
  __syncthreads();

  // Rows with no allowed key: uniform 1/S over every key, dropout applied;
  // a pass over all of V that only such rows need.
  bool empty_row = false;
#pragma unroll
  for (int j = 0; j < kSlabs; ++j) {
    empty_row |= (row_t[j][0] < sh.seqlen_q && l[j][0] == 0.f) || (row_t[j][1] < sh.seqlen_q && l[j][1] == 0.f);
  }
  if (__syncthreads_or(empty_row)) {
    const float uniform = sh.seqlen_k ? 1.f / float(sh.seqlen_k) : 0.f;
    for (int64_t s0 = 0; s0 < sh.seqlen_k; s0 += kBN) {
      load_tile<kBN>(v_s, v + s0 * ld_v, ld_v, sh.seqlen_k - s0, sh.head_dim_v, v_vec);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      float p[kSlabs][kST][4];
#pragma unroll
      for (int j = 0; j < kSlabs; ++j) {
#pragma unroll
        for (int nt = 0; nt < kST; ++nt) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int64_t s = s0 + nt * 8 + 2 * c;
            const bool use = row_t[j][r] < sh.seqlen_q && l[j][r] == 0.f;
            tf_fastattn::Philox4 w{};
            if (use && a.has_dropout) {
              w = tf_fastattn::dropout_words(dropout_seed(a), uint32_t(b), uint32_t(n), uint32_t(row_t[j][r]),
                                             uint32_t(s / 4));
            }
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const bool keep = !a.has_dropout || w.x[(s + e) % 4] >= a.dropout_threshold;
              p[j][nt][2 * r + e] =
                  use && s + e < sh.seqlen_k && keep ? uniform * (a.has_dropout ? a.inv_keep : 1.f) : 0.f;
            }
          }
        }
      }
      accumulate_pv(p, v_s, o);
      __syncthreads();  // every warp is done with V
    }
  }

  // Normalise, stage the block's output rows in Q's region as 16-bit values
  // (each warp writes and later reads its own rows only), and store them.
  uint16_t* const ow = q_s + warp * kSlabs * 16 * kLd;
#pragma unroll
  for (int j = 0; j < kSlabs; ++j) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t t = row_t[j][r];
      if (l[j][r] == 0.f && m[j][r] != -inf_f32()) l[j][r] = nan_f32();  // every allowed logit -inf: o and lse NaN
      const float inv = l[j][r] != 0.f ? 1.f / l[j][r] : 1.f;          // l NaN: a NaN row
      uint16_t* srow = ow + (j * 16 + g + 8 * r) * kLd;
#pragma unroll
      for (int nt = 0; nt < kOT; ++nt) {
        const uint32_t pair = pack2(o[j][nt][2 * r] * inv, o[j][nt][2 * r + 1] * inv);
        *reinterpret_cast<uint32_t*>(srow + nt * 8 + 2 * c) = pair;
      }
      if (c == 0 && t < sh.seqlen_q) {
        static_cast<float*>(a.lse)[(b * sh.num_heads + n) * sh.seqlen_q + t] =
            l[j][r] != 0.f ? m[j][r] * kLn2 + logf(l[j][r]) : inf_f32();
      }
    }
  }
  __syncthreads();  // every warp's staged rows are written
  uint16_t* const out = static_cast<uint16_t*>(a.o) + a.o_strides.offset(b, t0, n);
  const int64_t ld_o = a.o_strides.seq;
  if (rows_aligned16(out, ld_o, sh.head_dim_v)) {
#pragma unroll
    for (int it = 0; it < kBM * kChunks / kThreads; ++it) {
      const int i = it * kThreads + threadIdx.x, r = i / kChunks, ch = i % kChunks;
      if (r < rows && 8 * ch < sh.head_dim_v) {
        *reinterpret_cast<uint4*>(out + r * ld_o + 8 * ch) = *reinterpret_cast<const uint4*>(q_s + r * kLd + 8 * ch);
      }
    }
  } else {
    for (int i = threadIdx.x; i < kBM * kHp; i += kThreads) {
      const int r = i / kHp, h = i % kHp;
      if (r < rows && h < sh.head_dim_v) out[r * ld_o + h] = q_s[r * kLd + h];
    }
  }
}

}  // namespace
}  // namespace tfa

extern "C" __global__ void __launch_bounds__(tfa::kThreads) tfa_attention_mma_fwd(tfa::AttentionFwdParams a) {
  tfa::attention_fwd(a);
}
