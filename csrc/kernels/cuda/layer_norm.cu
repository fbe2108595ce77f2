// Fused residual-add + layer norm, forward and backward (see layer_norm.h for
// the math). Compiled by NVRTC once per input dtype (-DTFA_DTYPE=<id>).
//
// One row is handled by a row group: a warp (short rows: several rows per
// block, reductions by shuffles only) or the whole block (long rows: shuffles,
// then the warps' sums in warp order). Rows are read with 16-byte vector loads
// when the row length and pointers allow it (kAligned) and kept in registers
// (kVecs vectors per thread) between the statistics and the output pass.
// Statistics are float32 (float64 for float64 input) and two-pass, like the
// CPU kernel. Every reduction has a fixed order: results are deterministic.
#include "common.cuh"
#include "layer_norm_args.h"

namespace tfa {
namespace {

using T = TypeOf<TFA_DTYPE>::type;
using A = AccOf<T>::type;
constexpr int kE = 16 / sizeof(T);  // elements per 16-byte vector

__device__ __forceinline__ A acc_sqrt(A v) {
  if constexpr (sizeof(A) == 8) {
    return sqrt(v);
  } else {
    return sqrtf(v);
  }
}

template <bool kAligned>
__device__ __forceinline__ void load_vec(const T* row, int64_t col0, int64_t cols, A* out) {
  if (kAligned) {
    // cols % kE == 0 and 16-byte aligned rows: a vector is all in or all out.
    if (col0 < cols) {
      const uint4 raw = *reinterpret_cast<const uint4*>(row + col0);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kE; ++i) out[i] = to_acc(e[i]);
    } else {
#pragma unroll
      for (int i = 0; i < kE; ++i) out[i] = A(0);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kE; ++i) out[i] = col0 + i < cols ? to_acc(row[col0 + i]) : A(0);
  }
}

template <bool kAligned>
__device__ __forceinline__ void store_vec(T* row, int64_t col0, int64_t cols, const A* in) {
  if (kAligned) {
    if (col0 >= cols) return;
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < kE; ++i) e[i] = from_acc<T>(in[i]);
    *reinterpret_cast<uint4*>(row + col0) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < kE; ++i) {
      if (col0 + i < cols) row[col0 + i] = from_acc<T>(in[i]);
    }
  }
}

// gamma/beta element c (0 past the row end): float32 or the input dtype.
__device__ __forceinline__ A load_param(const void* p, int32_t is_float, int64_t c, int64_t cols) {
  if (c >= cols) return A(0);
  return is_float ? A(static_cast<const float*>(p)[c]) : A(to_acc(static_cast<const T*>(p)[c]));
}

// Sum over the row group (a warp, or the whole block), identical in every
// thread. `scratch` holds one value per warp.
__device__ __forceinline__ A group_sum(A v, int group_threads, A* scratch) {
  v = lanes_sum(v, 32);
  if (group_threads <= 32) return v;
  __syncthreads();  // the previous group_sum may still be reading scratch
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  A total = A(0);
  for (int w = 0; w < group_threads / 32; ++w) total += scratch[w];
  return total;
}

// s = x + residual rounded to T (the sum output is in T and the reference adds
// in T), for one vector of row `row`.
template <bool kAligned>
__device__ __forceinline__ void load_sum(const LayerNormFwdParams& a, int64_t row, int64_t col0, A* s) {
  load_vec<kAligned>(static_cast<const T*>(a.x) + row * a.x_row_stride, col0, a.cols, s);
  if (a.residual) {
    A r[kE];
    load_vec<kAligned>(static_cast<const T*>(a.residual) + row * a.residual_row_stride, col0, a.cols, r);
#pragma unroll
    for (int e = 0; e < kE; ++e) s[e] = to_acc(from_acc<T>(s[e] + r[e]));
  }
}

template <int kVecs, bool kAligned>
__device__ void layer_norm_fwd(const LayerNormFwdParams& a) {
  __shared__ A scratch[32];
  const int G = a.threads_per_row;
  const int lane = threadIdx.x % G;
  const int groups = blockDim.x / G;
  const int64_t cols = a.cols;
  const A inv_cols = A(1) / A(cols);
  for (int64_t row = int64_t(blockIdx.x) * groups + threadIdx.x / G; row < a.rows;
       row += int64_t(gridDim.x) * groups) {
    A mean, rstd;
    A cache[kVecs > 0 ? kVecs : 1][kE];
    A part = A(0);
    if constexpr (kVecs > 0) {
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        load_sum<kAligned>(a, row, int64_t(lane + i * G) * kE, cache[i]);
#pragma unroll
        for (int e = 0; e < kE; ++e) part += cache[i][e];
      }
      mean = a.norm_kind == tf_fastattn::kRmsNorm ? A(0) : group_sum(part, G, scratch) * inv_cols;
      part = A(0);
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        const int64_t col0 = int64_t(lane + i * G) * kE;
#pragma unroll
        for (int e = 0; e < kE; ++e) {
          const A d = col0 + e < cols ? cache[i][e] - mean : A(0);
          part += d * d;
        }
      }
    } else {
      for (int64_t col0 = int64_t(lane) * kE; col0 < cols; col0 += int64_t(G) * kE) {
        load_sum<kAligned>(a, row, col0, cache[0]);
#pragma unroll
        for (int e = 0; e < kE; ++e) part += cache[0][e];
      }
      mean = a.norm_kind == tf_fastattn::kRmsNorm ? A(0) : group_sum(part, G, scratch) * inv_cols;
      part = A(0);
      for (int64_t col0 = int64_t(lane) * kE; col0 < cols; col0 += int64_t(G) * kE) {
        load_sum<kAligned>(a, row, col0, cache[0]);
#pragma unroll
        for (int e = 0; e < kE; ++e) {
          const A d = col0 + e < cols ? cache[0][e] - mean : A(0);
          part += d * d;
        }
      }
    }
    rstd = A(1) / acc_sqrt(group_sum(part, G, scratch) * inv_cols + A(a.epsilon));
    if (lane == 0) {
      static_cast<A*>(a.mean)[row] = mean;
      static_cast<A*>(a.rstd)[row] = rstd;
    }
    // Writes the sum output (when asked) and y for one vector of s. For
    // kRmsScaling (y not centred) the mean comes back as mean * rstd: a shift
    // of its own instead of the mean doubled the registers of the float32
    // forward with 8 vectors a thread on sm_60 (105 -> 128, spilling).
    const A y_add = a.norm_kind == tf_fastattn::kRmsScaling ? mean * rstd : A(0);
    auto normalize = [&](int64_t col0, A* s) {
      if (a.sum) store_vec<kAligned>(static_cast<T*>(a.sum) + row * a.sum_row_stride, col0, cols, s);
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        A y = (s[e] - mean) * rstd + y_add;
        if (a.gamma) y *= load_param(a.gamma, a.param_is_float, col0 + e, cols);
        if (a.beta) y += load_param(a.beta, a.param_is_float, col0 + e, cols);
        s[e] = y;
      }
      store_vec<kAligned>(static_cast<T*>(a.y) + row * a.y_row_stride, col0, cols, s);
    };
    if constexpr (kVecs > 0) {
#pragma unroll
      for (int i = 0; i < kVecs; ++i) normalize(int64_t(lane + i * G) * kE, cache[i]);
    } else {
      for (int64_t col0 = int64_t(lane) * kE; col0 < cols; col0 += int64_t(G) * kE) {
        load_sum<kAligned>(a, row, col0, cache[0]);
        normalize(col0, cache[0]);
      }
    }
  }
}

// Backward of one row over the vectors a thread owns; per vector: load s and
// dy, accumulate the two row sums. Returns via mean_g / mean_gx.
template <int kVecs, bool kAligned>
__device__ void layer_norm_bwd(const LayerNormBwdParams& a) {
  __shared__ A scratch[32];
  const int G = a.threads_per_row;
  const int lane = threadIdx.x % G;
  const int group = threadIdx.x / G;
  const int groups = blockDim.x / G;
  const int64_t cols = a.cols;
  const A inv_cols = A(1) / A(cols);
  const int64_t r0 = int64_t(blockIdx.x) * a.rows_per_chunk;
  const int64_t r1 = r0 + a.rows_per_chunk < a.rows ? r0 + a.rows_per_chunk : a.rows;
  A* partial_g = static_cast<A*>(a.workspace) + int64_t(blockIdx.x) * 2 * cols;
  A* partial_b = partial_g + cols;
  const T* sum_in = static_cast<const T*>(a.sum);
  const T* dy_in = static_cast<const T*>(a.dy);

  // One vector of the row: xhat = (s - mean) * rstd, g = dy * gamma, and
  // the row-sum terms. kRmsScaling (y = s * rstd * gamma: u = xhat + c with
  // c = mean * rstd in layer_norm.h) adds c's part afterwards: mean(g u) =
  // mean(g xhat) + c mean(g), and dgamma's sum of dy c goes to the dbeta
  // partials, which it has no use for (added to dgamma's by the column pass).
  // (u kept and xhat formed as u - c lost xhat to cancellation where the mean
  // dominates: one column, dx off by 5e-3; u as a second term per element
  // spilled on sm_60.)
  const bool scaling = a.norm_kind == tf_fastattn::kRmsScaling;
  auto row_terms = [&](int64_t r, int64_t col0, A mean, A rstd, A* xhat, A* dy, A* g, A* sum_g, A* sum_gx) {
    load_vec<kAligned>(sum_in + r * a.sum_row_stride, col0, cols, xhat);
    load_vec<kAligned>(dy_in + r * a.dy_row_stride, col0, cols, dy);
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      xhat[e] = col0 + e < cols ? (xhat[e] - mean) * rstd : A(0);
      g[e] = a.gamma ? dy[e] * load_param(a.gamma, a.param_is_float, col0 + e, cols) : dy[e];
      *sum_g += g[e];
      *sum_gx += g[e] * xhat[e];
    }
  };
  // mean(g u) for the row from the group's sums (see row_terms).
  auto mean_gu = [&](A sum_g, A sum_gx, A c) {
    const A gx = group_sum(sum_gx, G, scratch);
    return (scaling ? gx + c * group_sum(sum_g, G, scratch) : gx) * inv_cols;
  };
  // ds = rstd (g - mean_g - xhat mean_gx) (+ dsum).
  auto store_ds = [&](int64_t r, int64_t col0, A rstd, A mean_g, A mean_gx, const A* xhat, const A* g) {
    A ds[kE];
    if (a.dsum) load_vec<kAligned>(static_cast<const T*>(a.dsum) + r * a.dsum_row_stride, col0, cols, ds);
#pragma unroll
    for (int e = 0; e < kE; ++e) ds[e] = rstd * (g[e] - mean_g - xhat[e] * mean_gx) + (a.dsum ? ds[e] : A(0));
    store_vec<kAligned>(static_cast<T*>(a.dx) + r * a.dx_row_stride, col0, cols, ds);
  };

  if constexpr (kVecs > 0) {
    // Per-thread dgamma/dbeta partials for the columns this lane owns, summed
    // over the rows of this group, then over the groups in group order.
    A dg[kVecs][kE], db[kVecs][kE];
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
#pragma unroll
      for (int e = 0; e < kE; ++e) dg[i][e] = db[i][e] = A(0);
    }
    for (int64_t row = r0 + group; row < r1; row += groups) {
      const A mean = static_cast<const A*>(a.mean)[row];
      const A rstd = static_cast<const A*>(a.rstd)[row];
      const A c = scaling ? mean * rstd : A(1);  // the dbeta partials' weight (see row_terms)
      A xhat[kVecs][kE], dy[kVecs][kE], g[kVecs][kE];
      A sum_g = A(0), sum_gx = A(0);
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        row_terms(row, int64_t(lane + i * G) * kE, mean, rstd, xhat[i], dy[i], g[i], &sum_g, &sum_gx);
#pragma unroll
        for (int e = 0; e < kE; ++e) {
          dg[i][e] += dy[i][e] * xhat[i][e];
          db[i][e] += scaling ? dy[i][e] * c : dy[i][e];
        }
      }
      const A mean_gx = mean_gu(sum_g, sum_gx, c);
      const A mean_g = a.norm_kind == tf_fastattn::kLayerNorm ? group_sum(sum_g, G, scratch) * inv_cols : A(0);
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        store_ds(row, int64_t(lane + i * G) * kE, rstd, mean_g, mean_gx, xhat[i], g[i]);
      }
    }
    for (int gi = 0; gi < groups; ++gi) {
      if (gi == group) {
#pragma unroll
        for (int i = 0; i < kVecs; ++i) {
          const int64_t col0 = int64_t(lane + i * G) * kE;
#pragma unroll
          for (int e = 0; e < kE; ++e) {
            if (col0 + e < cols) {
              partial_g[col0 + e] = gi ? partial_g[col0 + e] + dg[i][e] : dg[i][e];
              partial_b[col0 + e] = gi ? partial_b[col0 + e] + db[i][e] : db[i][e];
            }
          }
        }
      }
      __syncthreads();  // the next group adds to what this one wrote
    }
  } else {
    // Rows too long to cache (one group per block): two passes over global
    // memory per row; each thread accumulates its own columns of the block's
    // partials in place.
    for (int64_t col0 = int64_t(lane) * kE; col0 < cols; col0 += int64_t(G) * kE) {
      for (int e = 0; e < kE && col0 + e < cols; ++e) partial_g[col0 + e] = partial_b[col0 + e] = A(0);
    }
    for (int64_t row = r0; row < r1; ++row) {
      const A mean = static_cast<const A*>(a.mean)[row];
      const A rstd = static_cast<const A*>(a.rstd)[row];
      const A c = scaling ? mean * rstd : A(1);
      A xhat[kE], dy[kE], g[kE];
      A sum_g = A(0), sum_gx = A(0);
      for (int64_t col0 = int64_t(lane) * kE; col0 < cols; col0 += int64_t(G) * kE) {
        row_terms(row, col0, mean, rstd, xhat, dy, g, &sum_g, &sum_gx);
      }
      const A mean_gx = mean_gu(sum_g, sum_gx, c);
      const A mean_g = a.norm_kind == tf_fastattn::kLayerNorm ? group_sum(sum_g, G, scratch) * inv_cols : A(0);
      for (int64_t col0 = int64_t(lane) * kE; col0 < cols; col0 += int64_t(G) * kE) {
        A unused_g = A(0), unused_gx = A(0);
        row_terms(row, col0, mean, rstd, xhat, dy, g, &unused_g, &unused_gx);
        store_ds(row, col0, rstd, mean_g, mean_gx, xhat, g);
        for (int e = 0; e < kE && col0 + e < cols; ++e) {
          partial_g[col0 + e] += dy[e] * xhat[e];
          partial_b[col0 + e] += scaling ? dy[e] * c : dy[e];
        }
      }
    }
  }
}

// Column pass: dgamma/dbeta = the chunks' partials added in chunk order.
__device__ void layer_norm_bwd_reduce(const LayerNormBwdParams& a) {
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= a.cols) return;
  const A* partial = static_cast<const A*>(a.workspace);
  A g = A(0), b = A(0);
  for (int64_t c = 0; c < a.chunks; ++c) {
    g += partial[(2 * c) * a.cols + col];
    b += partial[(2 * c + 1) * a.cols + col];
  }
  if (a.norm_kind == tf_fastattn::kRmsScaling) g += b;  // dgamma's sum of dy * mean * rstd (layer_norm_bwd)
  if (a.param_is_float) {
    if (a.dgamma) static_cast<float*>(a.dgamma)[col] = float(g);
    if (a.dbeta) static_cast<float*>(a.dbeta)[col] = float(b);
  } else {
    if (a.dgamma) static_cast<T*>(a.dgamma)[col] = from_acc<T>(g);
    if (a.dbeta) static_cast<T*>(a.dbeta)[col] = from_acc<T>(b);
  }
}

}  // namespace
}  // namespace tfa

// Entry points: tfa_layer_norm_{fwd,bwd}_v<kVecs>_<a|u> (aligned or not).
// Which kVecs exist per dtype follows layer_norm_max_vecs() in
// layer_norm_args.h (the register budget is explained there).
#define TFA_LN_FWD(N)                                                                                   \
  extern "C" __global__ void __launch_bounds__(tfa::kLayerNormMaxThreads, 1) tfa_layer_norm_fwd_v##N##_a(tfa::LayerNormFwdParams a) { \
    tfa::layer_norm_fwd<N, true>(a);                                                                    \
  }                                                                                                     \
  extern "C" __global__ void __launch_bounds__(tfa::kLayerNormMaxThreads, 1) tfa_layer_norm_fwd_v##N##_u(tfa::LayerNormFwdParams a) { \
    tfa::layer_norm_fwd<N, false>(a);                                                                   \
  }
#define TFA_LN_BWD(N)                                                                                   \
  extern "C" __global__ void __launch_bounds__(tfa::kLayerNormMaxThreads, 1) tfa_layer_norm_bwd_v##N##_a(tfa::LayerNormBwdParams a) { \
    tfa::layer_norm_bwd<N, true>(a);                                                                    \
  }                                                                                                     \
  extern "C" __global__ void __launch_bounds__(tfa::kLayerNormMaxThreads, 1) tfa_layer_norm_bwd_v##N##_u(tfa::LayerNormBwdParams a) { \
    tfa::layer_norm_bwd<N, false>(a);                                                                   \
  }

#define TFA_LN_ELEM_BYTES (TFA_DTYPE == 3 ? 8 : TFA_DTYPE == 2 ? 4 : 2)

TFA_LN_FWD(0)
TFA_LN_FWD(1)
TFA_LN_FWD(2)
TFA_LN_FWD(4)
#if TFA_LN_ELEM_BYTES >= 4
TFA_LN_FWD(8)
#endif
TFA_LN_BWD(0)
TFA_LN_BWD(1)
TFA_LN_BWD(2)
#if TFA_LN_ELEM_BYTES == 8
TFA_LN_BWD(4)
#endif

extern "C" __global__ void __launch_bounds__(256) tfa_layer_norm_bwd_reduce(tfa::LayerNormBwdParams a) {
  tfa::layer_norm_bwd_reduce(a);
}
