// CPU kernels for the fused residual-add + layer norm (see layer_norm.h).
//
// Each row is loaded once into a float32 (float64 for float64 input) buffer,
// the statistics are computed two-pass on that buffer, and the output is
// written in one more pass. The per-row float loops are compiled for several
// ISAs with GCC's target_clones and picked at load time, so a portable build
// still uses AVX2/AVX-512 where the CPU has them.
#include <algorithm>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define TFA_LN_X86 1
#endif
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/convert.h"
#include "kernels/cpu/cpu_types.h"
#include "tf_fastattn/layer_norm.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TFA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TFA_CLONES
#endif

namespace tf_fastattn {
namespace {

using cpu::bfloat16_t;
using cpu::half_t;

// Rows per reduction chunk in the backward: a function of `rows` only, so the
// dgamma/dbeta summation order never depends on the thread count.
constexpr int64_t kMaxBwdChunks = 64;
int64_t bwd_num_chunks(int64_t rows) { return std::max<int64_t>(1, std::min(rows, kMaxBwdChunks)); }

// ---- per-row float kernels (vectorised by the compiler) --------------------

// Sums are accumulated in double even for float rows: a float accumulator
// over a 4096-wide row loses about 3x the accuracy of TensorFlow's tree
// reduction. Without -ffast-math the compiler may not reorder a scalar sum, so
// the sums run in kLanes independent lanes (a fixed order, hence
// deterministic) that it can vectorise; a single accumulator chain was
// latency-bound at ~4 cycles per element (measured: 21 ms for 8192x1024).
constexpr int kLanes = 16;

template <typename A, typename F>
__attribute__((always_inline)) inline void lane_sums(int64_t n, F term, double* out0, double* out1) {
  double acc0[kLanes] = {}, acc1[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      double a, b;
      term(i + j, &a, &b);
      acc0[j] += a;
      acc1[j] += b;
    }
  }
  double s0 = 0, s1 = 0;
  for (; i < n; ++i) {
    double a, b;
    term(i, &a, &b);
    s0 += a;
    s1 += b;
  }
  for (int j = 0; j < kLanes; ++j) {
    s0 += acc0[j];
    s1 += acc1[j];
  }
  *out0 = s0;
  *out1 = s1;
}

// `row_sum` is the row's sum when the caller already has it (the residual add
// computes it on the way), else NaN. `rms`: the mean is taken as 0 (RMS norm:
// rstd from the mean of squares).
template <typename A>
__attribute__((always_inline)) inline void row_stats_impl(const A* s, int64_t n, double eps, double row_sum,
                                                          bool rms, A* mean_out, A* rstd_out) {
  double sum = row_sum, unused;
  if (std::isnan(row_sum) && !rms) {
    lane_sums<A>(n, [&](int64_t i, double* a, double* b) { *a = s[i]; *b = 0; }, &sum, &unused);
  }
  const A mean = rms ? A(0) : static_cast<A>(sum / static_cast<double>(n));
  double sq;
  lane_sums<A>(n, [&](int64_t i, double* a, double* b) {
    const double d = static_cast<double>(s[i] - mean);
    *a = d * d;
    *b = 0;
  }, &sq, &unused);
  *mean_out = mean;
  *rstd_out = static_cast<A>(1.0 / std::sqrt(sq / static_cast<double>(n) + eps));
}
TFA_CLONES void row_stats(const float* s, int64_t n, double eps, double row_sum, bool rms, float* m, float* r) {
  row_stats_impl(s, n, eps, row_sum, rms, m, r);
}
TFA_CLONES void row_stats(const double* s, int64_t n, double eps, double row_sum, bool rms, double* m, double* r) {
  row_stats_impl(s, n, eps, row_sum, rms, m, r);
}

// y = (s - mean) * rstd * gamma + beta, into the float buffer `y`.
template <typename A>
__attribute__((always_inline)) inline void row_normalize_impl(const A* s, int64_t n, A mean, A rstd,
                                                              const A* gamma, const A* beta, A* y) {
  if (gamma && beta) {
    for (int64_t i = 0; i < n; ++i) y[i] = (s[i] - mean) * rstd * gamma[i] + beta[i];
  } else if (gamma) {
    for (int64_t i = 0; i < n; ++i) y[i] = (s[i] - mean) * rstd * gamma[i];
  } else if (beta) {
    for (int64_t i = 0; i < n; ++i) y[i] = (s[i] - mean) * rstd + beta[i];
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = (s[i] - mean) * rstd;
  }
}
TFA_CLONES void row_normalize(const float* s, int64_t n, float m, float r, const float* g, const float* b,
                              float* y) {
  row_normalize_impl(s, n, m, r, g, b, y);
}
TFA_CLONES void row_normalize(const double* s, int64_t n, double m, double r, const double* g,
                              const double* b, double* y) {
  row_normalize_impl(s, n, m, r, g, b, y);
}

// Backward of one row. In: s, dy (and dsum, may be null) as floats. Out: ds
// into `ds`; accumulates dy * u into dgamma_acc and dy into dbeta_acc.
// kind: NormKind (layer_norm.h: u = s * rstd for kRmsScaling, else xhat; the
// mean(g) term only for the layer norm).
template <typename A>
__attribute__((always_inline)) inline void row_backward_impl(const A* s, const A* dy, const A* dsum, int64_t n,
                                                             A mean, A rstd, const A* gamma, int32_t kind, A* ds,
                                                             double* dgamma_acc, double* dbeta_acc) {
  const A u_shift = kind == kRmsScaling ? A(0) : mean;  // u = (s - u_shift) * rstd
  double sum_g, sum_gx;  // double lanes, for the same reasons as row_stats
  // g is kept in ds (rounded, as the sums see it): recomputed in the last
  // loop, dy * gamma - mean(g) was contracted into an FMA, and with one
  // column (g = mean(g)) ds came out as rstd times the product's rounding
  // error instead of 0 (float32, C 1, epsilon 1e-6: 6e-5).
  lane_sums<A>(n, [&](int64_t i, double* a, double* b) {
    const A u = (s[i] - u_shift) * rstd;
    const A g = gamma ? dy[i] * gamma[i] : dy[i];
    ds[i] = g;
    *a = g;
    *b = static_cast<double>(g) * u;
  }, &sum_g, &sum_gx);
  const A mean_g = kind == kLayerNorm ? static_cast<A>(sum_g / static_cast<double>(n)) : A(0);
  const A mean_gx = static_cast<A>(sum_gx / static_cast<double>(n));
  // One pass for ds and the dgamma / dbeta sums (two passes before: the
  // float32 RMS norm's backward on [8192, 4096] took 43 ms with the row
  // copies, against 18 ms for its forward).
  for (int64_t i = 0; i < n; ++i) {
    const A u = (s[i] - u_shift) * rstd;
    const A xhat = (s[i] - mean) * rstd;
    dgamma_acc[i] += static_cast<double>(dy[i]) * u;
    dbeta_acc[i] += dy[i];
    A v = rstd * (ds[i] - mean_g - xhat * mean_gx);
    if (dsum) v += dsum[i];
    ds[i] = v;
  }
}
TFA_CLONES void row_backward(const float* s, const float* dy, const float* dsum, int64_t n, float m, float r,
                             const float* g, int32_t kind, float* ds, double* dga, double* dba) {
  row_backward_impl(s, dy, dsum, n, m, r, g, kind, ds, dga, dba);
}
TFA_CLONES void row_backward(const double* s, const double* dy, const double* dsum, int64_t n, double m,
                             double r, const double* g, int32_t kind, double* ds, double* dga, double* dba) {
  row_backward_impl(s, dy, dsum, n, m, r, g, kind, ds, dga, dba);
}

// ---- float32 rows with streaming stores (AVX-512) ------------------------
//
// For outputs larger than the caches, the sum and y are written with
// non-temporal stores: a plain store first reads the line it writes (for
// ownership), so 2 reads + 2 writes per element cost the memory bus 6 line
// transfers instead of 4. Measured on a 2-in/2-out stream of 8192x1024
// float32, one thread: 3.7 ms with stores, 2.4 ms with streaming stores.
// Used only when both outputs are 64-byte aligned row by row (cols % 16 == 0
// and aligned bases, which TensorFlow's allocator gives).
#ifdef TFA_LN_X86
constexpr int64_t kStreamMinBytes = 8 << 20;  // smaller outputs stay in cache for their consumer

__attribute__((target("avx512f"))) double add_rows_stream(const float* x, const float* r, int64_t n, float* s,
                                                           float* sum_out) {
  __m512d acc[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 v0 = _mm512_add_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(r + i));
    const __m512 v1 = _mm512_add_ps(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(r + i + 16));
    _mm512_storeu_ps(s + i, v0);
    _mm512_storeu_ps(s + i + 16, v1);
    _mm512_stream_ps(sum_out + i, v0);
    _mm512_stream_ps(sum_out + i + 16, v1);
    acc[0] = _mm512_add_pd(acc[0], _mm512_cvtps_pd(_mm512_castps512_ps256(v0)));
    acc[1] = _mm512_add_pd(acc[1], _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v0), 1))));
    acc[2] = _mm512_add_pd(acc[2], _mm512_cvtps_pd(_mm512_castps512_ps256(v1)));
    acc[3] = _mm512_add_pd(acc[3], _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v1), 1))));
  }
  for (; i < n; i += 16) {  // n % 16 == 0
    const __m512 v = _mm512_add_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(r + i));
    _mm512_storeu_ps(s + i, v);
    _mm512_stream_ps(sum_out + i, v);
    acc[0] = _mm512_add_pd(acc[0], _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    acc[1] = _mm512_add_pd(acc[1], _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(acc[0], acc[1]), _mm512_add_pd(acc[2], acc[3])));
}

// y = (s - mean) * rstd * gamma + beta with streaming stores (gamma, beta may be null).
__attribute__((target("avx512f"))) void normalize_stream(const float* s, int64_t n, float mean, float rstd,
                                                          const float* gamma, const float* beta, float* y) {
  const __m512 m = _mm512_set1_ps(mean), rs = _mm512_set1_ps(rstd);
  for (int64_t i = 0; i < n; i += 16) {
    __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(s + i), m), rs);
    if (gamma) v = _mm512_mul_ps(v, _mm512_loadu_ps(gamma + i));
    if (beta) v = _mm512_add_ps(v, _mm512_loadu_ps(beta + i));
    _mm512_stream_ps(y + i, v);
  }
}

bool use_streaming_stores(const LayerNormFwdParams& p) {
  static const bool has_avx512 = __builtin_cpu_supports("avx512f");
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 64 == 0; };
  return has_avx512 && p.dtype == DType::kFloat32 && p.residual && p.sum && p.cols % 16 == 0 &&
         p.y_row_stride % 16 == 0 && p.sum_row_stride % 16 == 0 && p.rows * p.cols * 4 >= kStreamMinBytes &&
         aligned(p.y) && aligned(p.sum);
}
#endif

// ---- loads and stores between element types and float buffers ------------

template <typename T, typename A>
inline void load_row(const T* src, int64_t n, A* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<A>(cpu::to_float(src[i]));
}
template <typename T, typename A>
inline void store_row(const A* src, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = cpu::from_acc<T>(src[i]);
}
// 16-bit rows go through the vectorised converters: the scalar ones made the
// bfloat16 forward 4x slower than float32's.
inline void load_row(const half_t* src, int64_t n, float* dst) { cpu::load_as_float(src, DType::kFloat16, n, dst); }
inline void load_row(const bfloat16_t* src, int64_t n, float* dst) {
  cpu::load_as_float(src, DType::kBFloat16, n, dst);
}
inline void store_row(const float* src, int64_t n, half_t* dst) { cpu::store_from_float(src, n, DType::kFloat16, dst); }
inline void store_row(const float* src, int64_t n, bfloat16_t* dst) {
  cpu::store_from_float(src, n, DType::kBFloat16, dst);
}

// s = x + r, also stored to `sum_out` (the sum output); returns sum(s), so
// the statistics need one pass less.
template <typename A>
__attribute__((always_inline)) inline double add_rows_impl(const A* x, const A* r, int64_t n, A* s, A* sum_out) {
  double total, unused;
  lane_sums<A>(n, [&](int64_t i, double* a, double* b) {
    const A v = x[i] + r[i];
    s[i] = v;
    sum_out[i] = v;
    *a = v;
    *b = 0;
  }, &total, &unused);
  return total;
}
TFA_CLONES double add_rows(const float* x, const float* r, int64_t n, float* s, float* sum_out) {
  return add_rows_impl(x, r, n, s, sum_out);
}
TFA_CLONES double add_rows(const double* x, const double* r, int64_t n, double* s, double* sum_out) {
  return add_rows_impl(x, r, n, s, sum_out);
}
TFA_CLONES void add_rows(float* a, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] += b[i];
}
TFA_CLONES void add_rows(double* a, const double* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] += b[i];
}

// s = x + residual, rounded to T (the reference adds in T before normalising,
// and the sum output is in T), kept as floats for the statistics. `tmp` is a
// scratch row of n floats.
template <typename T, typename A>
inline void load_sum(const T* x, const T* r, int64_t n, A* s, T* sum_out, A* tmp) {
  load_row(x, n, s);
  load_row(r, n, tmp);
  add_rows(s, tmp, n);
  if (!std::is_same<T, A>::value) {
    // round through T so that s equals the stored sum exactly
    T* rounded = sum_out ? sum_out : reinterpret_cast<T*>(tmp);
    store_row(s, n, rounded);
    load_row(rounded, n, s);
  } else if (sum_out) {
    store_row(s, n, sum_out);
  }
}

template <typename A>
void load_param(const void* p, DType t, int64_t n, std::vector<A>* out) {
  if (!p) return;
  out->resize(n);
  switch (t) {
    case DType::kFloat16: load_row(static_cast<const half_t*>(p), n, out->data()); break;
    case DType::kBFloat16: load_row(static_cast<const bfloat16_t*>(p), n, out->data()); break;
    case DType::kFloat32: load_row(static_cast<const float*>(p), n, out->data()); break;
    case DType::kFloat64: load_row(static_cast<const double*>(p), n, out->data()); break;
  }
}

template <typename T>
void forward(const LayerNormFwdParams& p, const CpuContext& ctx) {
  using A = typename cpu::AccType<T>::type;
  const int64_t n = p.cols;
  std::vector<A> gamma, beta;
  load_param(p.gamma, p.param_dtype, n, &gamma);
  load_param(p.beta, p.param_dtype, n, &beta);
  const A* g = p.gamma ? gamma.data() : nullptr;
  const A* b = p.beta ? beta.data() : nullptr;
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  T* sum = static_cast<T*>(p.sum);
  A* mean = static_cast<A*>(p.mean);
  A* rstd = static_cast<A*>(p.rstd);
#ifdef TFA_LN_X86
  const bool stream = use_streaming_stores(p);
#endif
  // The RMS kinds: statistics about 0 (kRmsNorm), or y not centred (kRmsScaling).
  const bool rms = p.norm_kind == kRmsNorm, centred_y = p.norm_kind == kLayerNorm;
  ctx.parallel_for(p.rows, 12 * n, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(3 * n);
    A* s = buf.data();
    A* out = s + n;
    A* tmp = out + n;
    for (int64_t r = begin; r < end; ++r) {
      // Row r of each tensor (rows finalize()d strides apart; columns contiguous).
      const T* xr = x + r * p.x_row_stride;
      const T* rr = res ? res + r * p.residual_row_stride : nullptr;
      T* yr = y + r * p.y_row_stride;
      T* sr = sum ? sum + r * p.sum_row_stride : nullptr;
#ifdef TFA_LN_X86
      if constexpr (std::is_same<T, float>::value) {
        if (stream) {
          const double row_sum = add_rows_stream(xr, rr, n, s, sr);
          row_stats(s, n, p.epsilon, row_sum, rms, &mean[r], &rstd[r]);
          normalize_stream(s, n, centred_y ? mean[r] : 0.0f, rstd[r], g, b, yr);
          continue;
        }
      }
#endif
      if constexpr (std::is_same<T, A>::value) {
        // float32/float64 rows need no conversion: read x (and r) once,
        // write the sum and y straight to their outputs. The staged version
        // (copy in, normalise into a buffer, copy out) ran at half the speed
        // of a plain 2-in/2-out stream (8.0 vs 4.0 ms for 8192x1024, 1 thread).
        const A* row = xr;
        double row_sum = std::numeric_limits<double>::quiet_NaN();
        if (res) {
          row_sum = add_rows(xr, rr, n, s, sum ? sr : tmp);
          row = s;
        } else if (sum) {
          std::copy(xr, xr + n, sr);
        }
        row_stats(row, n, p.epsilon, row_sum, rms, &mean[r], &rstd[r]);
        row_normalize(row, n, centred_y ? mean[r] : A(0), rstd[r], g, b, yr);
        continue;
      }
      if (res) {
        load_sum(xr, rr, n, s, sr, tmp);
      } else {
        load_row(xr, n, s);
        if (sum) std::copy(xr, xr + n, sr);
      }
      row_stats(s, n, p.epsilon, std::numeric_limits<double>::quiet_NaN(), rms, &mean[r], &rstd[r]);
      row_normalize(s, n, centred_y ? mean[r] : A(0), rstd[r], g, b, out);
      store_row(out, n, yr);
    }
#ifdef TFA_LN_X86
    if (stream) _mm_sfence();  // streaming stores are weakly ordered: publish them before returning
#endif
  });
}

template <typename A>
void store_param(const A* src, int64_t n, DType t, void* dst) {
  switch (t) {
    case DType::kFloat16: store_row(src, n, static_cast<half_t*>(dst)); break;
    case DType::kBFloat16: store_row(src, n, static_cast<bfloat16_t*>(dst)); break;
    case DType::kFloat32: store_row(src, n, static_cast<float*>(dst)); break;
    case DType::kFloat64: store_row(src, n, static_cast<double*>(dst)); break;
  }
}

template <typename T>
void backward(const LayerNormBwdParams& p, const CpuContext& ctx) {
  using A = typename cpu::AccType<T>::type;
  const int64_t n = p.cols, rows = p.rows;
  std::vector<A> gamma;
  load_param(p.gamma, p.param_dtype, n, &gamma);
  const A* g = p.gamma ? gamma.data() : nullptr;
  const T* dy = static_cast<const T*>(p.dy);
  const T* dsum = static_cast<const T*>(p.dsum);
  const T* s_in = static_cast<const T*>(p.sum);
  const A* mean = static_cast<const A*>(p.mean);
  const A* rstd = static_cast<const A*>(p.rstd);
  T* dx = static_cast<T*>(p.dx);
  // Stage 1: each chunk of rows writes its partial dgamma/dbeta sums to its
  // own slice of the workspace: [chunks, 2, cols], in double so that the
  // column sums lose no more than TensorFlow's tree reductions.
  const int64_t chunks = bwd_num_chunks(rows);
  double* partial = static_cast<double*>(p.workspace);
  ctx.parallel_for(chunks, 20 * n * std::max<int64_t>(1, rows / chunks), [&](int64_t c_begin, int64_t c_end) {
    std::vector<A> buf(4 * n);
    A* s = buf.data();
    A* d = s + n;
    A* ds_in = d + n;
    A* ds = ds_in + n;
    for (int64_t c = c_begin; c < c_end; ++c) {
      double* dga = partial + c * 2 * n;
      double* dba = dga + n;
      std::fill(dga, dga + 2 * n, 0.0);
      const int64_t r0 = rows * c / chunks, r1 = rows * (c + 1) / chunks;
      for (int64_t r = r0; r < r1; ++r) {
        if constexpr (std::is_same<T, A>::value) {
          // float32/float64 rows are read and written where they are.
          row_backward(s_in + r * p.sum_row_stride, dy + r * p.dy_row_stride,
                       dsum ? dsum + r * p.dsum_row_stride : nullptr, n, mean[r], rstd[r], g, p.norm_kind,
                       dx + r * p.dx_row_stride, dga, dba);
          continue;
        }
        load_row(s_in + r * p.sum_row_stride, n, s);
        load_row(dy + r * p.dy_row_stride, n, d);
        if (dsum) load_row(dsum + r * p.dsum_row_stride, n, ds_in);
        row_backward(s, d, dsum ? ds_in : nullptr, n, mean[r], rstd[r], g, p.norm_kind, ds, dga, dba);
        store_row(ds, n, dx + r * p.dx_row_stride);
      }
    }
  });
  if (!p.dgamma && !p.dbeta) return;
  // Stage 2: sum the chunk partials in chunk order, split over columns.
  constexpr int64_t kColBlock = 256;
  const int64_t col_blocks = (n + kColBlock - 1) / kColBlock;
  ctx.parallel_for(col_blocks, kColBlock * chunks * 2, [&](int64_t b0, int64_t b1) {
    std::vector<double> dg(kColBlock), db(kColBlock);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t j0 = blk * kColBlock, w = std::min(kColBlock, n - j0);
      std::fill(dg.begin(), dg.end(), 0.0);
      std::fill(db.begin(), db.end(), 0.0);
      for (int64_t c = 0; c < chunks; ++c) {
        const double* dga = partial + c * 2 * n + j0;
        const double* dba = dga + n;
        for (int64_t j = 0; j < w; ++j) {
          dg[j] += dga[j];
          db[j] += dba[j];
        }
      }
      if (p.dgamma) store_param(dg.data(), w, p.param_dtype, static_cast<char*>(p.dgamma) + j0 * dtype_size(p.param_dtype));
      if (p.dbeta) store_param(db.data(), w, p.param_dtype, static_cast<char*>(p.dbeta) + j0 * dtype_size(p.param_dtype));
    }
  });
}

}  // namespace

int64_t layer_norm_bwd_workspace_bytes(int64_t rows, int64_t cols, DType dtype) {
  if (rows <= 0 || cols <= 0) return 0;
  (void)dtype;
  return bwd_num_chunks(rows) * 2 * cols * static_cast<int64_t>(sizeof(double));
}

Status layer_norm_fwd_cpu(const LayerNormFwdParams& p, const CpuContext& ctx) {
  TFA_RETURN_IF_ERROR(validate(p));
  if (p.rows == 0) return Status::OK();
  switch (p.dtype) {
    case DType::kFloat16: forward<half_t>(p, ctx); break;
    case DType::kBFloat16: forward<bfloat16_t>(p, ctx); break;
    case DType::kFloat32: forward<float>(p, ctx); break;
    case DType::kFloat64: forward<double>(p, ctx); break;
  }
  return Status::OK();
}

Status layer_norm_bwd_cpu(const LayerNormBwdParams& p, const CpuContext& ctx) {
  TFA_RETURN_IF_ERROR(validate(p));
  if (p.rows == 0) {
    // Empty batch: parameter gradients are zero.
    std::vector<double> zeros(p.cols, 0.0);
    if (p.dgamma) store_param(zeros.data(), p.cols, p.param_dtype, p.dgamma);
    if (p.dbeta) store_param(zeros.data(), p.cols, p.param_dtype, p.dbeta);
    return Status::OK();
  }
  switch (p.dtype) {
    case DType::kFloat16: backward<half_t>(p, ctx); break;
    case DType::kBFloat16: backward<bfloat16_t>(p, ctx); break;
    case DType::kFloat32: backward<float>(p, ctx); break;
    case DType::kFloat64: backward<double>(p, ctx); break;
  }
  return Status::OK();
}

}  // namespace tf_fastattn
