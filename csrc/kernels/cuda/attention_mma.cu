// Attention forward on tensor cores: mma.sync.m16n8k16 with float16 or
// bfloat16 inputs and float32 accumulation, for sm_80 and newer.
//
// Compiled per (dtype, head-dim bucket): -DTFA_DTYPE=<0|1> -DTFA_HEAD_DIM=<32..256>
// -DTFA_BACKWARD=0. Math and conventions: tf_fastattn/attention.h; tile
// shapes and shared-memory layout: attention_args.h.
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
constexpr int kBM = kMmaRowTile;
constexpr int kBN = mma_key_tile(kHp);
constexpr int kLd = kHp + 8;   // Q and K row stride (elements)
constexpr int kVld = kBN + 8;  // Vt row stride
constexpr int kThreads = 32 * kMmaWarps;
constexpr int kOT = kHp / 8;  // output n-tiles per warp
constexpr float kLn2 = 0.6931471805599453f;

// [rows, cols] 16-bit tile (global row stride ld) into shared memory, row
// stride sld, or transposed (element (r, c) at c * sld + r); zero outside
// rows_valid x cols_valid.
template <int kRows, int kCols, bool kTranspose>
__device__ __forceinline__ void load_tile(uint16_t* dst, int sld, const uint16_t* src, int64_t ld, int64_t rows_valid,
                                          int64_t cols_valid) {
  for (int i = threadIdx.x; i < kRows * kCols; i += kThreads) {
    const int r = i / kCols, c = i % kCols;
    const uint16_t v = (r < rows_valid && c < cols_valid) ? src[r * ld + c] : uint16_t(0);
    dst[kTranspose ? c * sld + r : r * sld + c] = v;
  }
}

// o += P Vt^T for one key tile; p holds P in the C layout of kBN / 8 n-tiles.
__device__ __forceinline__ void accumulate_pv(const float (&p)[kBN / 8][4], const uint16_t* vt_s, int64_t head_dim_v,
                                              float (&o)[kOT][4]) {
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
#pragma unroll
  for (int ks = 0; ks < kBN / 16; ++ks) {
    const uint32_t af[4] = {pack2(p[2 * ks][0], p[2 * ks][1]), pack2(p[2 * ks][2], p[2 * ks][3]),
                            pack2(p[2 * ks + 1][0], p[2 * ks + 1][1]), pack2(p[2 * ks + 1][2], p[2 * ks + 1][3])};
#pragma unroll
    for (int nt = 0; nt < kOT; ++nt) {
      if (nt * 8 >= head_dim_v) break;
      const uint16_t* row = vt_s + (nt * 8 + g) * kVld + ks * 16 + 2 * c;
      mma16816(o[nt], af, ld32(row), ld32(row + 8));
    }
  }
}

__device__ void attention_fwd(const AttentionFwdParams& a) {
  const tf_fastattn::AttentionShape& sh = a.shape;
  uint16_t* const smem = dynamic_smem<uint16_t>();
  uint16_t* q_s = smem;                // [kBM][kLd]
  uint16_t* k_s = q_s + kBM * kLd;     // [kBN][kLd]
  uint16_t* vt_s = k_s + kBN * kLd;    // [kHp][kVld]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int64_t tiles = (sh.seqlen_q + kBM - 1) / kBM;
  const int64_t tile = tiles - 1 - blockIdx.x % tiles;  // longest causal tiles first
  const int64_t bn = blockIdx.x / tiles;
  const int64_t n = bn % sh.num_heads, b = bn / sh.num_heads, hk = n / (sh.num_heads / sh.num_heads_kv);
  const int64_t t0 = tile * kBM;
  const int64_t rows = sh.seqlen_q - t0 < kBM ? sh.seqlen_q - t0 : kBM;
  load_tile<kBM, kHp, false>(q_s, kLd, static_cast<const uint16_t*>(a.q) + a.q_strides.offset(b, t0, n),
                             a.q_strides.seq, rows, sh.head_dim);
  const uint16_t* k = static_cast<const uint16_t*>(a.k) + a.k_strides.offset(b, 0, hk);
  const uint16_t* v = static_cast<const uint16_t*>(a.v) + a.v_strides.offset(b, 0, hk);
  const int64_t ld_k = a.k_strides.seq, ld_v = a.v_strides.seq;

  float o[kOT][4], m[2], l[2];
#pragma unroll
  for (int nt = 0; nt < kOT; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
  m[0] = m[1] = -inf_f32();
  l[0] = l[1] = 0.f;
  const uint16_t* qw = q_s + warp * 16 * kLd;
  const int64_t row_t[2] = {t0 + warp * 16 + g, t0 + warp * 16 + g + 8};

  // Only the key tiles the block's band reaches (causal, window, offset).
  const Band band = band_of(a);
  const int64_t s_end = band_key_end(band, t0, rows, sh.seqlen_k);
  for (int64_t s0 = band_key_begin(band, t0) / kBN * kBN; s0 < s_end; s0 += kBN) {
    __syncthreads();  // the previous tile's K and Vt are consumed
    load_tile<kBN, kHp, false>(k_s, kLd, k + s0 * ld_k, ld_k, sh.seqlen_k - s0, sh.head_dim);
    load_tile<kBN, kHp, true>(vt_s, kVld, v + s0 * ld_v, ld_v, sh.seqlen_k - s0, sh.head_dim_v);
    __syncthreads();
    float x[kBN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) x[nt][0] = x[nt][1] = x[nt][2] = x[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kHp; kk += 16) {
      if (kk >= sh.head_dim) break;
      const uint32_t af[4] = {ld32(qw + g * kLd + kk + 2 * c), ld32(qw + (g + 8) * kLd + kk + 2 * c),
                              ld32(qw + g * kLd + kk + 8 + 2 * c), ld32(qw + (g + 8) * kLd + kk + 8 + 2 * c)};
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
        const uint16_t* row = k_s + (nt * 8 + g) * kLd + kk + 2 * c;
        mma16816(x[nt], af, ld32(row), ld32(row + 8));
      }
    }
    // Online softmax on rows g (r = 0) and g + 8 (r = 1); a row's 4 lanes
    // are a quad, reduced with 2 shuffles.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -inf_f32();
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t s = s0 + nt * 8 + 2 * c + e;
          float& xv = x[nt][2 * r + e];
          const bool ok = allowed(a, band, b, n, row_t[r], s);
          xv = ok ? logit2(a, xv).x2 : -inf_f32();
          mx = fmaxf(mx, max_term(ok, xv));
        }
      }
      const float m_new = fmaxf(m[r], lanes_max(mx, 4));
      const float alpha = m_new == -inf_f32() ? 1.f : exp2f(m[r] - m_new);
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& xv = x[nt][2 * r + e];
          xv = m_new == -inf_f32() ? 0.f : exp2f(xv - m_new);
          sum += xv;
        }
      }
      l[r] = l[r] * alpha + lanes_sum(sum, 4);
      m[r] = m_new;
#pragma unroll
      for (int nt = 0; nt < kOT; ++nt) {
        o[nt][2 * r] *= alpha;
        o[nt][2 * r + 1] *= alpha;
      }
      if (a.has_dropout && row_t[r] < sh.seqlen_q) {
        // A lane's key pair 2c, 2c+1 of an n-tile is half of one Philox draw.
#pragma unroll
        for (int nt = 0; nt < kBN / 8; ++nt) {
          const int64_t s = s0 + nt * 8 + 2 * c;
          const tf_fastattn::Philox4 w = tf_fastattn::dropout_words(dropout_seed(a), uint32_t(b), uint32_t(n),
                                                                    uint32_t(row_t[r]), uint32_t(s / 4));
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            x[nt][2 * r + e] *= w.x[(s + e) % 4] >= a.dropout_threshold ? a.inv_keep : 0.f;
          }
        }
      }
    }
    accumulate_pv(x, vt_s, sh.head_dim_v, o);
  }

  // Rows with no allowed key: uniform 1/S over every key, dropout applied;
  // a pass over all of V that only such rows need.
  const bool empty_row = (row_t[0] < sh.seqlen_q && l[0] == 0.f) || (row_t[1] < sh.seqlen_q && l[1] == 0.f);
  if (__syncthreads_or(empty_row)) {
    const float uniform = sh.seqlen_k ? 1.f / float(sh.seqlen_k) : 0.f;
    for (int64_t s0 = 0; s0 < sh.seqlen_k; s0 += kBN) {
      __syncthreads();
      load_tile<kBN, kHp, true>(vt_s, kVld, v + s0 * ld_v, ld_v, sh.seqlen_k - s0, sh.head_dim_v);
      __syncthreads();
      float p[kBN / 8][4];
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t s = s0 + nt * 8 + 2 * c;
          const bool use = row_t[r] < sh.seqlen_q && l[r] == 0.f;
          tf_fastattn::Philox4 w{};
          if (use && a.has_dropout) {
            w = tf_fastattn::dropout_words(dropout_seed(a), uint32_t(b), uint32_t(n), uint32_t(row_t[r]), uint32_t(s / 4));
          }
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const bool keep = !a.has_dropout || w.x[(s + e) % 4] >= a.dropout_threshold;
            p[nt][2 * r + e] = use && s + e < sh.seqlen_k && keep ? uniform * (a.has_dropout ? a.inv_keep : 1.f) : 0.f;
          }
        }
      }
      accumulate_pv(p, vt_s, sh.head_dim_v, o);
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t t = row_t[r];
    if (t >= sh.seqlen_q) continue;
    if (l[r] == 0.f && m[r] != -inf_f32()) l[r] = nan_f32();  // every allowed logit -inf: o and lse NaN
    const float inv = l[r] != 0.f ? 1.f / l[r] : 1.f;  // l NaN: a NaN row
    T* out = static_cast<T*>(a.o) + a.o_strides.offset(b, t, n);
#pragma unroll
    for (int nt = 0; nt < kOT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int h = nt * 8 + 2 * c + e;
        if (h < sh.head_dim_v) out[h] = from_acc<T>(o[nt][2 * r + e] * inv);
      }
    }
    if (c == 0) {
      static_cast<float*>(a.lse)[(b * sh.num_heads + n) * sh.seqlen_q + t] =
          l[r] != 0.f ? m[r] * kLn2 + logf(l[r]) : inf_f32();
    }
  }
}

}  // namespace
}  // namespace tfa

extern "C" __global__ void __launch_bounds__(tfa::kThreads) tfa_attention_mma_fwd(tfa::AttentionFwdParams a) {
  tfa::attention_fwd(a);
}
