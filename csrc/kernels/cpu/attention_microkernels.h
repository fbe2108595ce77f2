// Micro-kernels of the CPU attention (the only code that differs per SIMD tier).
//
// The build targets a portable x86-64 baseline, so the AVX-512 and AVX2
// (attention_avx2.h) versions carry their own target attributes and are
// picked at run time from the CPU's features (cpu_tier()); the portable
// versions are plain loops that are always correct (and the only ones for
// float64).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cctype>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/cpu/cpu_types.h"
#include "tf_fastattn/philox.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#define TFA_HAVE_X86_DISPATCH 1
#else
#define TFA_HAVE_X86_DISPATCH 0
#endif

namespace tf_fastattn {
namespace cpu {

template <typename Acc>
struct MicroKernels {
  // C[m][n] (+)= A[m][k] * B[k][n], all row-major with leading dimensions;
  // n is a multiple of 16 and the B and C rows hold n readable elements.
  // Sums over k in chunks of kGemmKc terms (see GemmInto).
  void (*gemm)(int64_t m, int64_t n, int64_t k, const Acc* a, int64_t lda, const Acc* b, int64_t ldb, Acc* c,
               int64_t ldc, bool accumulate);
  // The same with A stored transposed: C[m][n] (+)= A^T * B, A is [k][m] (lda).
  // Lets the backward form P^T dO and dS^T Q from row-major P and dS.
  void (*gemm_tn)(int64_t m, int64_t n, int64_t k, const Acc* a, int64_t lda, const Acc* b, int64_t ldb, Acc* c,
                  int64_t ldc, bool accumulate);
  // x[i] = exp(x[i] - shift) for i < n; returns their sum. x may hold -inf.
  Acc (*exp_shift_sum)(Acc* x, int64_t n, Acc shift);
  // The float32 backward's dS tile with a wide dP = dO V^T:
  //   ds[i][j] = Acc(p[i][j] * (f[i][j] * (A B)[i][j] - delta[i]))
  // for i < m, j < n (n a multiple of 16), A [m][k] and B [k][n] row-major,
  // A B summed in float64 (see the tiers), the rest in float64 and rounded
  // once; f null means f = 1 (no dropout), otherwise p is then replaced by
  // the float32 product p * f (the dropped probabilities); p, f, ds share the
  // leading dimension ldp. dS = P (dP - delta) cancels when one key dominates a row,
  // so float32 rounding of dP (a few ulps of |dP|, not of dP - delta)
  // decided the gradient's error.
  void (*ds_wide)(int64_t m, int64_t n, int64_t k, const Acc* a, int64_t lda, const Acc* b, int64_t ldb, Acc* p,
                  const Acc* f, const double* delta, Acc* ds, int64_t ldp);
  // The forward's online-softmax step on one tile of logits s [nr][nc] (lds):
  // per row r, m_new = max(m[r], max_j s[r][j]); a row with m_new = -inf is
  // set to 0; otherwise corr = exp(m[r] - m_new), s[r][j] = exp(s[r][j] -
  // m_new), l[r] = l[r] corr + sum_j s[r][j], m[r] = m_new, and the output
  // accumulator row acc[r][0..hv) (ldacc) is multiplied by corr unless it is 1.
  void (*softmax_step)(int64_t nr, int64_t nc, Acc* s, int64_t lds, Acc* m, Acc* l, Acc* acc, int64_t ldacc,
                       int64_t hv);
  // Logit soft-capping: x[r][c] = cap * tanh(x[r][c] / cap) for r < nr, c <
  // nc (ld apart); d non-null: d[r][c] (same ld) = 1 - tanh^2, the
  // derivative the backward multiplies dS by. NaN stays NaN, +-inf gives
  // +-cap. The AVX tiers' tanh is within 2 ulp (the portable tier's std::tanh).
  void (*soft_cap)(int64_t nr, int64_t nc, Acc* x, int64_t ld, Acc cap, Acc* d);
  // The same for float16/bfloat16 inputs: the AVX tiers' tanh is a rational
  // function within 7 ulp (4e-7 absolute; the half types round the logits
  // they stand for to 1e-3 and 8e-3), a third of soft_cap's work. With the
  // accurate tanh the cap cost 19-21% of a bfloat16 forward + backward at
  // head dim 64 (T 2048, causal), against 7-11% in float32.
  void (*soft_cap_half)(int64_t nr, int64_t nc, Acc* x, int64_t ld, Acc cap, Acc* d);
  // The half types' dS tile from dP held in ds (BwdTile): ds[i][j] = p[i][j] *
  // (f[i][j] * ds[i][j] - Acc(delta[i])), then p[i][j] *= f[i][j]; f null:
  // ds[i][j] = p[i][j] * (ds[i][j] - Acc(delta[i])). For i < m, j < n, one
  // rounding per operation (no fused multiply-add), as the loop BwdTile runs
  // where this is null.
  void (*ds_narrow)(int64_t m, int64_t n, Acc* p, const Acc* f, const double* delta, Acc* ds, int64_t ld) = nullptr;
};

// Every tier's gemm sums k in chunks of kGemmKc terms: the first chunk's FMA
// chain starts from 0 (or continues C's value when accumulating), each later
// chunk's chain starts from 0 and its sum is then added into C. One chain over
// all of k rounds at the magnitude of the running sum: at head dim 256 the
// float32 logits q . k (std ~8) came out ~2.7x as far from float64 as
// NumPy's, whose SIMD loop keeps several partial sums, and o, dq, dk, dv
// exceeded the accuracy criterion by up to 1.8x; chunks of 64 bring the logits
// within NumPy's error. Products with k <= kGemmKc (all but the logits) are
// one chain, as before. In the AVX tiers a chunk of B (64 x 64 floats) also
// stays in L1 while the row blocks of A pass it.
constexpr int64_t kGemmKc = 64;

// What a chunk does with C: C = sum (kStore), the chain starts from C
// (kChain), C = C + sum (kAdd).
enum class GemmInto { kStore, kChain, kAdd };

// The one chunk schedule of every tier: f(k0, kc, into) for the chunks
// [k0, k0 + kc) of k in order (once, with kc = 0, when k = 0).
template <typename F>
inline void for_each_k_chunk(int64_t k, bool accumulate, F&& f) {
  for (int64_t k0 = 0; k0 < std::max<int64_t>(k, 1); k0 += kGemmKc)
    f(k0, std::min(kGemmKc, k - k0),
      k0 > 0 ? GemmInto::kAdd : accumulate ? GemmInto::kChain : GemmInto::kStore);
}

// ---------------------------------------------------------------------------
// Portable tier.

// A(i, p) is a[i * lda + p], or a[p * lda + i] when TRANS_A.
template <typename Acc, bool TRANS_A>
void gemm_portable(int64_t m, int64_t n, int64_t k, const Acc* a, int64_t lda, const Acc* b, int64_t ldb, Acc* c,
                   int64_t ldc, bool accumulate) {
  std::vector<Acc> part(k > kGemmKc ? n : 0);
  for (int64_t i = 0; i < m; ++i) {
    Acc* ci = c + i * ldc;
    for_each_k_chunk(k, accumulate, [&](int64_t k0, int64_t kc, GemmInto into) {
      Acc* sum = into == GemmInto::kAdd ? part.data() : ci;
      if (into != GemmInto::kChain) std::fill(sum, sum + n, Acc(0));
      for (int64_t p = k0; p < k0 + kc; ++p) {
        const Acc av = TRANS_A ? a[p * lda + i] : a[i * lda + p];
        const Acc* bp = b + p * ldb;
        for (int64_t j = 0; j < n; ++j) sum[j] += av * bp[j];
      }
      if (into == GemmInto::kAdd)
        for (int64_t j = 0; j < n; ++j) ci[j] += part[j];
    });
  }
}

// Portable: every product (exact in float64 for float32 operands) summed in float64.
template <typename Acc>
void ds_wide_portable(int64_t m, int64_t n, int64_t k, const Acc* a, int64_t lda, const Acc* b, int64_t ldb, Acc* p,
                      const Acc* f, const double* delta, Acc* ds, int64_t ldp) {
  double acc[64];
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j0 = 0; j0 < n; j0 += 64) {
      const int64_t nb = std::min<int64_t>(64, n - j0);
      std::fill(acc, acc + nb, 0.0);
      for (int64_t q = 0; q < k; ++q) {
        const double av = a[i * lda + q];
        const Acc* bq = b + q * ldb + j0;
        for (int64_t j = 0; j < nb; ++j) acc[j] += av * static_cast<double>(bq[j]);
      }
      Acc* pi = p + i * ldp + j0;
      Acc* di = ds + i * ldp + j0;
      if (f != nullptr) {
        const Acc* fi = f + i * ldp + j0;
        for (int64_t j = 0; j < nb; ++j) {
          di[j] = static_cast<Acc>(static_cast<double>(pi[j]) * (static_cast<double>(fi[j]) * acc[j] - delta[i]));
          pi[j] *= fi[j];
        }
      } else {
        for (int64_t j = 0; j < nb; ++j) di[j] = static_cast<Acc>(static_cast<double>(pi[j]) * (acc[j] - delta[i]));
      }
    }
  }
}

template <typename Acc>
Acc row_max_portable(const Acc* x, int64_t n) {
  Acc r = -std::numeric_limits<Acc>::infinity();
  for (int64_t i = 0; i < n; ++i) r = std::max(r, x[i]);
  return r;
}

// Whether x[0..n) holds a NaN. The online softmax asks when a row's maximum
// is -inf: a row whose allowed logits are all NaN (a NaN query, say) must
// give NaN, not the empty row's uniform average (row maxima skip NaN).
template <typename Acc>
inline bool has_nan(const Acc* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (x[i] != x[i]) return true;
  return false;
}

template <typename Acc>
Acc exp_shift_sum_portable(Acc* x, int64_t n, Acc shift) {
  Acc sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

template <typename Acc>
void softmax_step_portable(int64_t nr, int64_t nc, Acc* s, int64_t lds, Acc* m, Acc* l, Acc* acc, int64_t ldacc,
                           int64_t hv) {
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  for (int64_t r = 0; r < nr; ++r) {
    Acc* sr = s + r * lds;
    Acc m_new = std::max(m[r], row_max_portable(sr, nc));
    if (m_new == neg_inf) {  // nothing allowed so far in this row, or NaN logits
      if (!has_nan(sr, nc)) {
        std::fill(sr, sr + nc, Acc(0));
        continue;
      }
      m_new = std::numeric_limits<Acc>::quiet_NaN();  // the row's result is NaN from here on
    }
    // exp(-inf) = 0 on the first allowed tile; exp(0) = 1 needs no call.
    const Acc corr = m_new == m[r] ? Acc(1) : std::exp(m[r] - m_new);
    l[r] = l[r] * corr + exp_shift_sum_portable(sr, nc, m_new);
    m[r] = m_new;
    if (corr != Acc(1)) {
      Acc* ar = acc + r * ldacc;
      for (int64_t h = 0; h < hv; ++h) ar[h] *= corr;
    }
  }
}

template <typename Acc>
void soft_cap_portable(int64_t nr, int64_t nc, Acc* x, int64_t ld, Acc cap, Acc* d) {
  for (int64_t r = 0; r < nr; ++r) {
    for (int64_t c = 0; c < nc; ++c) {
      const Acc t = std::tanh(x[r * ld + c] / cap);
      x[r * ld + c] = t * cap;
      if (d != nullptr) d[r * ld + c] = Acc(1) - t * t;
    }
  }
}

template <typename Acc>
const MicroKernels<Acc>& portable_kernels() {
  static const MicroKernels<Acc> k = {gemm_portable<Acc, false>, gemm_portable<Acc, true>, exp_shift_sum_portable<Acc>,
                                      ds_wide_portable<Acc>, softmax_step_portable<Acc>, soft_cap_portable<Acc>,
                                      soft_cap_portable<Acc>};
  return k;
}

template <typename Acc>
const MicroKernels<Acc>& micro_kernels();

template <>
inline const MicroKernels<double>& micro_kernels<double>() {
  return portable_kernels<double>();
}

#if TFA_HAVE_X86_DISPATCH
// ---------------------------------------------------------------------------
// AVX-512 tier (float32).

// GCC 12 reports its own AVX-512 intrinsic headers (their `__m512 __Y = __Y`
// placeholder for undefined lanes) as uninitialised reads when they are
// inlined into target-attributed functions; the lanes are never used.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define TFA_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,fma")))

// One MR x (16 * NV) block of C in registers. 6 x 4 vectors = 24 accumulators
// hide the FMA latency of two pipes, and leave room for the 4 B vectors and
// one broadcast of A in the 32 zmm registers.
template <int MR, int NV, bool TRANS_A>
TFA_AVX512 inline void gemm_block_avx512(int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                                         int64_t ldc, GemmInto into) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      acc[i][j] = into == GemmInto::kChain ? _mm512_loadu_ps(c + i * ldc + 16 * j) : _mm512_setzero_ps();
  for (int64_t p = 0; p < k; ++p) {
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) bv[j] = _mm512_loadu_ps(b + p * ldb + 16 * j);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(TRANS_A ? a[p * lda + i] : a[i * lda + p]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
  if (into == GemmInto::kAdd) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_add_ps(_mm512_loadu_ps(c + i * ldc + 16 * j), acc[i][j]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(c + i * ldc + 16 * j, acc[i][j]);
}

template <int NV, bool TRANS_A>
TFA_AVX512 inline void gemm_rows_avx512(int64_t m, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                                        float* c, int64_t ldc, GemmInto into) {
  // Row i of A starts at a + i * lda, or at a + i when A is transposed.
  const int64_t row_step = TRANS_A ? 1 : lda;
  int64_t i = 0;
  for (; i + 6 <= m; i += 6)
    gemm_block_avx512<6, NV, TRANS_A>(k, a + i * row_step, lda, b, ldb, c + i * ldc, ldc, into);
  switch (m - i) {
    case 5: gemm_block_avx512<5, NV, TRANS_A>(k, a + i * row_step, lda, b, ldb, c + i * ldc, ldc, into); break;
    case 4: gemm_block_avx512<4, NV, TRANS_A>(k, a + i * row_step, lda, b, ldb, c + i * ldc, ldc, into); break;
    case 3: gemm_block_avx512<3, NV, TRANS_A>(k, a + i * row_step, lda, b, ldb, c + i * ldc, ldc, into); break;
    case 2: gemm_block_avx512<2, NV, TRANS_A>(k, a + i * row_step, lda, b, ldb, c + i * ldc, ldc, into); break;
    case 1: gemm_block_avx512<1, NV, TRANS_A>(k, a + i * row_step, lda, b, ldb, c + i * ldc, ldc, into); break;
    default: break;
  }
}

// Column panels of 64 outer, row blocks inner: the k x 64 panel of B stays in
// L1 while every row block of A streams past it.
template <bool TRANS_A>
TFA_AVX512 inline void gemm_avx512(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                                   int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  for_each_k_chunk(k, accumulate, [&](int64_t k0, int64_t kc, GemmInto into) TFA_AVX512 {
    const float* ak = TRANS_A ? a + k0 * lda : a + k0;
    const float* bk = b + k0 * ldb;
    for (int64_t j = 0; j < n; j += 64) {
      switch (std::min<int64_t>(4, (n - j) / 16)) {
        case 4: gemm_rows_avx512<4, TRANS_A>(m, kc, ak, lda, bk + j, ldb, c + j, ldc, into); break;
        case 3: gemm_rows_avx512<3, TRANS_A>(m, kc, ak, lda, bk + j, ldb, c + j, ldc, into); break;
        case 2: gemm_rows_avx512<2, TRANS_A>(m, kc, ak, lda, bk + j, ldb, c + j, ldc, into); break;
        default: gemm_rows_avx512<1, TRANS_A>(m, kc, ak, lda, bk + j, ldb, c + j, ldc, into); break;
      }
    }
  });
}

// ds_wide: float32 FMAs (exact products) summed over chunks of kKc terms of
// the k dimension, each chunk's float32 sum then added into float64
// accumulators. The float32 rounding happens only at the magnitude of a
// chunk's partial sums (about kKc / k of |dP| when the terms add up
// coherently, as they do when dP ~ delta). Measured (float32 backward,
// B=1, N=8, T=S=2048, H=64, 2 threads): +6% (full) and +2% (causal) over the
// float32 product, against +20% for a float64-FMA product. kKc = 16: on the
// AMD EPYC development CPU (Zen 5) one 64 x 64 x 256 tile ran at about 140
// GFLOP/s a core with kKc = 8 and about 155 with 16 (the plain product: 225); the
// conversions and float64 adds every 8 terms were the difference. Accuracy
// (error over the criterion's bound, float32 backward, 16 shapes x full and
// causal, logits scaled 1x and 4x): mean 0.430 with 8, 0.441 with 16, the
// same worst case (0.93, decided elsewhere). 4 rows x 32 columns: 8 float32
// and 16 float64 accumulators, 2 B vectors and 1 broadcast of A.
constexpr int kKc = 16;

TFA_AVX512 inline __m512d lo_pd(__m512 x) { return _mm512_cvtps_pd(_mm512_castps512_ps256(x)); }
TFA_AVX512 inline __m512d hi_pd(__m512 x) {
  return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
}

template <int MR, int NV>
TFA_AVX512 inline void ds_wide_block_avx512(int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                                            float* p, const float* f, const double* delta, float* ds, int64_t ldp) {
  __m512d dlo[MR][NV], dhi[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) dlo[i][j] = dhi[i][j] = _mm512_setzero_pd();
  for (int64_t q0 = 0; q0 < k; q0 += kKc) {
    const int64_t q1 = std::min<int64_t>(k, q0 + kKc);
    __m512 acc[MR][NV];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t q = q0; q < q1; ++q) {
      __m512 bv[NV];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) bv[j] = _mm512_loadu_ps(b + q * ldb + 16 * j);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m512 av = _mm512_set1_ps(a[i * lda + q]);
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) {
        dlo[i][j] = _mm512_add_pd(dlo[i][j], lo_pd(acc[i][j]));
        dhi[i][j] = _mm512_add_pd(dhi[i][j], hi_pd(acc[i][j]));
      }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const __m512d dl = _mm512_set1_pd(delta[i]);
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      const int64_t off = i * ldp + 16 * j;
      const __m512 pv = _mm512_loadu_ps(p + off);
      __m512d xlo, xhi;
      if (f != nullptr) {
        const __m512 fv = _mm512_loadu_ps(f + off);
        xlo = _mm512_fmsub_pd(lo_pd(fv), dlo[i][j], dl);
        xhi = _mm512_fmsub_pd(hi_pd(fv), dhi[i][j], dl);
        _mm512_storeu_ps(p + off, _mm512_mul_ps(pv, fv));
      } else {
        xlo = _mm512_sub_pd(dlo[i][j], dl);
        xhi = _mm512_sub_pd(dhi[i][j], dl);
      }
      _mm256_storeu_ps(ds + off, _mm512_cvtpd_ps(_mm512_mul_pd(lo_pd(pv), xlo)));
      _mm256_storeu_ps(ds + off + 8, _mm512_cvtpd_ps(_mm512_mul_pd(hi_pd(pv), xhi)));
    }
  }
}

template <int NV>
TFA_AVX512 inline void ds_wide_rows_avx512(int64_t m, int64_t k, const float* a, int64_t lda, const float* b,
                                           int64_t ldb, float* p, const float* f, const double* delta, float* ds,
                                           int64_t ldp) {
  const auto fi = [&](int64_t i) { return f != nullptr ? f + i * ldp : nullptr; };
  int64_t i = 0;
  for (; i + 4 <= m; i += 4)
    ds_wide_block_avx512<4, NV>(k, a + i * lda, lda, b, ldb, p + i * ldp, fi(i), delta + i, ds + i * ldp, ldp);
  switch (m - i) {
    case 3: ds_wide_block_avx512<3, NV>(k, a + i * lda, lda, b, ldb, p + i * ldp, fi(i), delta + i, ds + i * ldp, ldp); break;
    case 2: ds_wide_block_avx512<2, NV>(k, a + i * lda, lda, b, ldb, p + i * ldp, fi(i), delta + i, ds + i * ldp, ldp); break;
    case 1: ds_wide_block_avx512<1, NV>(k, a + i * lda, lda, b, ldb, p + i * ldp, fi(i), delta + i, ds + i * ldp, ldp); break;
    default: break;
  }
}

// Column panels of 32 (n is a multiple of 16, so the last panel is 16 or 32).
TFA_AVX512 inline void ds_wide_avx512(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                                      int64_t ldb, float* p, const float* f, const double* delta, float* ds,
                                      int64_t ldp) {
  for (int64_t j = 0; j < n; j += 32) {
    const float* fj = f != nullptr ? f + j : nullptr;
    if (n - j >= 32)
      ds_wide_rows_avx512<2>(m, k, a, lda, b + j, ldb, p + j, fj, delta, ds + j, ldp);
    else
      ds_wide_rows_avx512<1>(m, k, a, lda, b + j, ldb, p + j, fj, delta, ds + j, ldp);
  }
}

inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << remaining) - 1u);
}

TFA_AVX512 inline void ds_narrow_avx512(int64_t m, int64_t n, float* p, const float* f, const double* delta, float* ds,
                                        int64_t ld) {
  // The _round_ forms are never contracted into an FMA by the compiler.
  constexpr int kRn = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t i = 0; i < m; ++i) {
    const __m512 dl = _mm512_set1_ps(static_cast<float>(delta[i]));
    float* pr = p + i * ld;
    float* dr = ds + i * ld;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 mk = tail_mask(n - j);
      const __m512 pv = _mm512_maskz_loadu_ps(mk, pr + j);
      __m512 dv = _mm512_maskz_loadu_ps(mk, dr + j);
      if (f != nullptr) {
        const __m512 fv = _mm512_maskz_loadu_ps(mk, f + i * ld + j);
        dv = _mm512_mul_round_ps(fv, dv, kRn);
        _mm512_mask_storeu_ps(pr + j, mk, _mm512_mul_round_ps(pv, fv, kRn));
      }
      _mm512_mask_storeu_ps(dr + j, mk, _mm512_mul_round_ps(pv, _mm512_sub_round_ps(dv, dl, kRn), kRn));
    }
  }
}

// exp(x) for 16 floats, about 1 ulp: x = n ln2 + r with |r| <= ln2 / 2 (ln2
// split in two parts so r is exact), e^r from the degree-7 Taylor-like
// polynomial 1 + r + r^2 P(r) (Cephes' minimax coefficients), then scaled by
// 2^n with vscalefps, which also flushes to 0 below the float range. Inputs
// are clamped so that -inf gives 0 rather than NaN.
TFA_AVX512 inline __m512 exp_avx512(__m512 x) {
  // (constant first: max/min return their second operand for NaN, so NaN
  // stays NaN instead of becoming exp(-104) = 0)
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  x = _mm512_min_ps(_mm512_set1_ps(88.7228f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

TFA_AVX512 inline float row_max_avx512(const float* x, int64_t n) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m = neg_inf;
  for (int64_t i = 0; i < n; i += 16) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(neg_inf, tail_mask(n - i), x + i));
  return _mm512_reduce_max_ps(m);
}

TFA_AVX512 inline float exp_shift_sum_avx512(float* x, int64_t n, float shift) {
  const __m512 s = _mm512_set1_ps(shift);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mk = tail_mask(n - i);
    const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, x + i), s));
    _mm512_mask_storeu_ps(x + i, mk, e);
    sum = _mm512_mask_add_ps(sum, mk, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// Full 64-column rows (kBc of the forward) unrolled without masks; the same
// arithmetic, in the same order, as row_max_avx512 and exp_shift_sum_avx512.
TFA_AVX512 inline void softmax_step_avx512(int64_t nr, int64_t nc, float* s, int64_t lds, float* m, float* l,
                                           float* acc, int64_t ldacc, int64_t hv) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < nr; ++r) {
    float* sr = s + r * lds;
    float rmax, rsum;
    float m_new;
    if (nc == 64) {
      const __m512 x0 = _mm512_loadu_ps(sr), x1 = _mm512_loadu_ps(sr + 16), x2 = _mm512_loadu_ps(sr + 32),
                   x3 = _mm512_loadu_ps(sr + 48);
      rmax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(_mm512_max_ps(_mm512_max_ps(_mm512_set1_ps(neg_inf), x0), x1), x2), x3));
      m_new = std::max(m[r], rmax);
      if (m_new == neg_inf) {
        if (!has_nan(sr, nc)) {
          std::fill(sr, sr + nc, 0.0f);
          continue;
        }
        m_new = std::numeric_limits<float>::quiet_NaN();  // as softmax_step_portable
      }
      const __m512 sh = _mm512_set1_ps(m_new);
      const __m512 e0 = exp_avx512(_mm512_sub_ps(x0, sh)), e1 = exp_avx512(_mm512_sub_ps(x1, sh)),
                   e2 = exp_avx512(_mm512_sub_ps(x2, sh)), e3 = exp_avx512(_mm512_sub_ps(x3, sh));
      _mm512_storeu_ps(sr, e0);
      _mm512_storeu_ps(sr + 16, e1);
      _mm512_storeu_ps(sr + 32, e2);
      _mm512_storeu_ps(sr + 48, e3);
      rsum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(_mm512_add_ps(e0, e1), e2), e3));
    } else {
      m_new = std::max(m[r], row_max_avx512(sr, nc));
      if (m_new == neg_inf) {
        if (!has_nan(sr, nc)) {
          std::fill(sr, sr + nc, 0.0f);
          continue;
        }
        m_new = std::numeric_limits<float>::quiet_NaN();
      }
      rsum = exp_shift_sum_avx512(sr, nc, m_new);
    }
    const float corr = m_new == m[r] ? 1.0f : std::exp(m[r] - m_new);
    // Rounded product, then the sum (as the portable tier): no FMA contraction.
    float lc = l[r] * corr;
    __asm__("" : "+v"(lc));
    l[r] = lc + rsum;
    m[r] = m_new;
    if (corr != 1.0f) {
      float* ar = acc + r * ldacc;
      const __m512 c = _mm512_set1_ps(corr);
      for (int64_t h = 0; h < hv; h += 16) {
        const __mmask16 mk = tail_mask(hv - h);
        _mm512_mask_storeu_ps(ar + h, mk, _mm512_mul_ps(c, _mm512_maskz_loadu_ps(mk, ar + h)));
      }
    }
  }
}

// Dropout with Philox4x32-10 on 16 counters at once (64 keys of a row per
// block; philox.h's generator, bit for bit). For rows r < nr and keys c < nc,
// with f = kept where the word of key s0 + c of row t0 + r is >= threshold
// and 0 otherwise: out[r * ld + c] = f, or with apply, out[r * ld + c] *= f
// (rounded as out * kept). s0 % 4 == 0.
//
// Layout: each word of the 16 counters (key quads s / 4, ..., s / 4 + 15) is
// two vectors, quads 0-7 and 8-15, one per 64-bit lane in its low half. Then
// one vpmuludq gives eight whole 32 x 32 -> 64-bit products, the high words
// are one shift away and the low words are the products themselves: their
// high halves are never read (vpmuludq reads the low halves, XOR keeps the
// halves apart), so they may hold anything. 12 vector operations per row and
// round instead of 16 with 16 counters in 32-bit lanes.
//
// The counter (s / 4, t, n, b) makes the first rounds partly shared: the
// quad varies with the lane only, t with the row only, n and b not at all.
// So round 0 is the same for every row except for the word t enters (a
// scalar per row), round 1's products are one shared pair of vectors and one
// scalar per row, and round 2 has one shared product; the rows' own vectors
// start with round 2's second product (15 of the 20 products per row).

struct PhiloxShared {
  __m512i r0_x3[2], r1_x1[2], r2_h0[2], r2_l0[2];
};

TFA_AVX512 inline PhiloxShared philox_shared_avx512(uint32_t k0_0, uint32_t k1_0, uint32_t ln, uint32_t b,
                                                    uint32_t quad0) {
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  const uint32_t k0_1 = k0_0 + kPhiloxW0;
  PhiloxShared sh;
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    const __m512i quad = _mm512_add_epi64(_mm512_set1_epi64(quad0 + 8 * h), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
    const __m512i p0 = _mm512_mul_epu32(quad, m0);
    const __m512i r0_x2 = _mm512_xor_si512(_mm512_srli_epi64(p0, 32), _mm512_set1_epi32(static_cast<int>(b ^ k1_0)));
    sh.r0_x3[h] = p0;
    const __m512i p1 = _mm512_mul_epu32(r0_x2, m1);
    const __m512i r1_x0 = _mm512_xor_si512(_mm512_srli_epi64(p1, 32), _mm512_set1_epi32(static_cast<int>(ln ^ k0_1)));
    sh.r1_x1[h] = p1;
    const __m512i p2 = _mm512_mul_epu32(r1_x0, m0);
    sh.r2_h0[h] = _mm512_srli_epi64(p2, 32);
    sh.r2_l0[h] = p2;
  }
  return sh;
}

// R rows t0 .. t0 + R - 1 of one block of keys (nc <= 64 of them).
template <int R>
TFA_AVX512 inline void dropout_rows_avx512(const PhiloxShared& sh, uint64_t seed, uint32_t hn, uint32_t threshold,
                                           float kept, uint32_t t0, int64_t nc, float* out, int64_t ld, bool apply) {
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(threshold));
  const __m512 kv = _mm512_set1_ps(kept);
  const uint32_t k0_0 = static_cast<uint32_t>(seed), k1_0 = static_cast<uint32_t>(seed >> 32);
  const uint32_t k0_1 = k0_0 + kPhiloxW0, k1_1 = k1_0 + kPhiloxW1;
  const uint32_t k0_2 = k0_1 + kPhiloxW0, k1_2 = k1_1 + kPhiloxW1;
  __m512i x0[R][2], x1[R][2], x2[R][2], x3[R][2];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    // Round 0 gives x0 = hn ^ t ^ k0 (a scalar); round 1's product of it:
    uint32_t hr, lr;
    philox_mulhilo(kPhiloxM0, hn ^ (t0 + static_cast<uint32_t>(r)) ^ k0_0, &hr, &lr);
    const __m512i a1 = _mm512_set1_epi32(static_cast<int>(hr ^ k1_1)), a2 = _mm512_set1_epi32(static_cast<int>(lr ^ k1_2));
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0_2));
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      // Round 2: the row's product of x2; x3 (= lr) enters x2 as a scalar.
      const __m512i p1 = _mm512_mul_epu32(_mm512_xor_si512(sh.r0_x3[h], a1), m1);
      x0[r][h] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p1, 32), sh.r1_x1[h], key0, 0x96);
      x1[r][h] = p1;
      x2[r][h] = _mm512_xor_si512(sh.r2_h0[h], a2);
      x3[r][h] = sh.r2_l0[h];
    }
  }
  uint32_t k0 = k0_2 + kPhiloxW0, k1 = k1_2 + kPhiloxW1;
#pragma GCC unroll 7
  for (int round = 3; round < 10; ++round) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0)), key1 = _mm512_set1_epi32(static_cast<int>(k1));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m512i p0 = _mm512_mul_epu32(x0[r][h], m0), p1 = _mm512_mul_epu32(x2[r][h], m1);
        x0[r][h] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p1, 32), x1[r][h], key0, 0x96);  // hi1 ^ x1 ^ k0
        x2[r][h] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p0, 32), x3[r][h], key1, 0x96);  // hi0 ^ x3 ^ k1
        x1[r][h] = p1;
        x3[r][h] = p0;
      }
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  // The low halves of the two vectors of a word, quads 0-15 in 32-bit lanes.
  const __m512i low_halves = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m512i y0 = _mm512_permutex2var_epi32(x0[r][0], low_halves, x0[r][1]);
    const __m512i y1 = _mm512_permutex2var_epi32(x1[r][0], low_halves, x1[r][1]);
    const __m512i y2 = _mm512_permutex2var_epi32(x2[r][0], low_halves, x2[r][1]);
    const __m512i y3 = _mm512_permutex2var_epi32(x3[r][0], low_halves, x3[r][1]);
    // Word u of lane i decides key 4 i + u: transpose the 4 x 16 words
    // into key order (within 128-bit lanes, then across them).
    const __m512i a = _mm512_unpacklo_epi32(y0, y1), bq = _mm512_unpacklo_epi32(y2, y3);
    const __m512i cq = _mm512_unpackhi_epi32(y0, y1), d = _mm512_unpackhi_epi32(y2, y3);
    const __m512i q0 = _mm512_unpacklo_epi64(a, bq), q1 = _mm512_unpackhi_epi64(a, bq);
    const __m512i q2 = _mm512_unpacklo_epi64(cq, d), q3 = _mm512_unpackhi_epi64(cq, d);
    const __m512i u0 = _mm512_shuffle_i32x4(q0, q1, 0x44), u1 = _mm512_shuffle_i32x4(q2, q3, 0x44);
    const __m512i u2 = _mm512_shuffle_i32x4(q0, q1, 0xEE), u3 = _mm512_shuffle_i32x4(q2, q3, 0xEE);
    const __m512i w[4] = {_mm512_shuffle_i32x4(u0, u1, 0x88), _mm512_shuffle_i32x4(u0, u1, 0xDD),
                          _mm512_shuffle_i32x4(u2, u3, 0x88), _mm512_shuffle_i32x4(u2, u3, 0xDD)};
    float* row = out + r * ld;
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const int64_t at = 16 * j;
      if (at >= nc) break;
      const __mmask16 keep = _mm512_cmpge_epu32_mask(w[j], thr);
      const __mmask16 tail = tail_mask(nc - at);
      const __m512 f = apply ? _mm512_maskz_mul_ps(keep, _mm512_maskz_loadu_ps(tail, row + at), kv)
                             : _mm512_maskz_mov_ps(keep, kv);
      _mm512_mask_storeu_ps(row + at, tail, f);
    }
  }
}

// Blocks of 64 keys outer (their shared rounds once), rows 3 at a time inner.
TFA_AVX512 inline void dropout_tile_avx512(uint64_t seed, uint32_t threshold, float kept, uint32_t b, uint32_t n,
                                           uint32_t t0, int64_t nr, int64_t s0, int64_t nc, float* out, int64_t ld,
                                           bool apply) {
  const uint32_t k0_0 = static_cast<uint32_t>(seed), k1_0 = static_cast<uint32_t>(seed >> 32);
  constexpr int RB = 3;  // 24 of the 32 registers hold the rows' counters
  uint32_t hn, ln;  // round 0's product of n: the same for every lane and row
  philox_mulhilo(kPhiloxM1, n, &hn, &ln);
  for (int64_t c = 0; c < nc; c += 64) {
    const PhiloxShared sh = philox_shared_avx512(k0_0, k1_0, ln, b, static_cast<uint32_t>((s0 + c) >> 2));
    const int64_t ncb = std::min<int64_t>(64, nc - c);
    float* oc = out + c;
    int64_t r = 0;
    for (; r + RB <= nr; r += RB)
      dropout_rows_avx512<RB>(sh, seed, hn, threshold, kept, t0 + static_cast<uint32_t>(r), ncb, oc + r * ld, ld, apply);
    for (; r < nr; ++r) dropout_rows_avx512<1>(sh, seed, hn, threshold, kept, t0 + static_cast<uint32_t>(r), ncb, oc + r * ld, ld, apply);
  }
}

// ---------------------------------------------------------------------------
// AVX512-BF16 tier: tile products of bfloat16 operands with vdpbf16ps, which
// multiplies 32 bf16 pairs exactly and adds them to 16 float accumulators, so
// one instruction does twice the multiply-adds of a float32 FMA. B is stored
// pair-interleaved ("VNNI" layout): element (p, j) of B [k][n] is at
// b[(p / 2) * ldb + 2 * j + p % 2], so lane j of one load holds rows p, p + 1
// of column j, and A supplies the matching pair (a[i][p], a[i][p + 1]) as one
// broadcast 32-bit word.

#define TFA_AVX512BF16 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx512bf16,fma")))

// TRANS_A: A stored transposed, pair-interleaved like B: the pair (A[i][2p],
// A[i][2p + 1]) is the 32-bit word at a + p * lda + 2 i (lda elements per row
// pair, >= 2 m). Lets the backward form P^T dO and dS^T Q with the pairs
// running over query rows.
template <int MR, int NV, bool TRANS_A>
TFA_AVX512BF16 inline void gemm_bf16_block(int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb,
                                           float* c, int64_t ldc, bool accumulate) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = accumulate ? _mm512_loadu_ps(c + i * ldc + 16 * j) : _mm512_setzero_ps();
  for (int64_t p = 0; p < kp; ++p) {
    __m512i bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) bv[j] = _mm512_loadu_si512(b + p * ldb + 32 * j);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      uint32_t pair;
      std::memcpy(&pair, TRANS_A ? a + p * lda + 2 * i : a + i * lda + 2 * p, sizeof(pair));
      const __m512i av = _mm512_set1_epi32(static_cast<int>(pair));
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)av, (__m512bh)bv[j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(c + i * ldc + 16 * j, acc[i][j]);
}

template <int NV, bool TRANS_A>
TFA_AVX512BF16 inline void gemm_bf16_rows(int64_t m, int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* b,
                                          int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  // Row i of A starts at a + i * lda, or (TRANS_A) at a + 2 i.
  const int64_t row_step = TRANS_A ? 2 : lda;
  int64_t i = 0;
  for (; i + 6 <= m; i += 6)
    gemm_bf16_block<6, NV, TRANS_A>(kp, a + i * row_step, lda, b, ldb, c + i * ldc, ldc, accumulate);
  const uint16_t* ai = a + i * row_step;
  float* ci = c + i * ldc;
  switch (m - i) {
    case 5: gemm_bf16_block<5, NV, TRANS_A>(kp, ai, lda, b, ldb, ci, ldc, accumulate); break;
    case 4: gemm_bf16_block<4, NV, TRANS_A>(kp, ai, lda, b, ldb, ci, ldc, accumulate); break;
    case 3: gemm_bf16_block<3, NV, TRANS_A>(kp, ai, lda, b, ldb, ci, ldc, accumulate); break;
    case 2: gemm_bf16_block<2, NV, TRANS_A>(kp, ai, lda, b, ldb, ci, ldc, accumulate); break;
    case 1: gemm_bf16_block<1, NV, TRANS_A>(kp, ai, lda, b, ldb, ci, ldc, accumulate); break;
    default: break;
  }
}

template <bool TRANS_A>
TFA_AVX512BF16 inline void gemm_bf16_panels(int64_t m, int64_t n, int64_t kp, const uint16_t* a, int64_t lda,
                                            const uint16_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  for (int64_t j = 0; j < n; j += 64) {
    switch (std::min<int64_t>(4, (n - j) / 16)) {
      case 4: gemm_bf16_rows<4, TRANS_A>(m, kp, a, lda, b + 2 * j, ldb, c + j, ldc, accumulate); break;
      case 3: gemm_bf16_rows<3, TRANS_A>(m, kp, a, lda, b + 2 * j, ldb, c + j, ldc, accumulate); break;
      case 2: gemm_bf16_rows<2, TRANS_A>(m, kp, a, lda, b + 2 * j, ldb, c + j, ldc, accumulate); break;
      default: gemm_bf16_rows<1, TRANS_A>(m, kp, a, lda, b + 2 * j, ldb, c + j, ldc, accumulate); break;
    }
  }
}

// C[m][n] (+)= A[m][2 kp] * B[2 kp][n]: A bf16 row-major (lda elements), B
// pair-interleaved (ldb elements per row pair, >= 2 n), C float; n % 16 == 0.
TFA_AVX512BF16 inline void gemm_bf16_avx512(int64_t m, int64_t n, int64_t kp, const uint16_t* a, int64_t lda,
                                            const uint16_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  gemm_bf16_panels<false>(m, n, kp, a, lda, b, ldb, c, ldc, accumulate);
}

// C[m][n] += A[m][2 kp] * B[2 kp][n] with A pair-interleaved (TRANS_A of
// gemm_bf16_block); always accumulates.
TFA_AVX512BF16 inline void gemm_bf16_tn_avx512(int64_t m, int64_t n, int64_t kp, const uint16_t* a, int64_t lda,
                                               const uint16_t* b, int64_t ldb, float* c, int64_t ldc) {
  gemm_bf16_panels<true>(m, n, kp, a, lda, b, ldb, c, ldc, true);
}

// Rows of a float tile x [rows][cols] (ldx) as bf16 row pairs: out[(r / 2) *
// ldo + 2 c + r % 2] = bf16(x[r][c]) for c < cols (a multiple of 16), with the
// partner of an odd last row written as 0.
TFA_AVX512BF16 inline void pair_rows_bf16_avx512(const float* x, int64_t ldx, int64_t rows, int64_t cols,
                                                 uint16_t* out, int64_t ldo) {
  // vcvtne2ps2bf16 puts its second operand's 16 values in the low half; this
  // index then alternates the halves: r0 c0, r1 c0, r0 c1, ...
  alignas(64) static constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                           8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kInterleave);
  for (int64_t r = 0; r < rows; r += 2) {
    const float* x0 = x + r * ldx;
    const float* x1 = r + 1 < rows ? x0 + ldx : nullptr;
    uint16_t* o = out + (r / 2) * ldo;
    for (int64_t c = 0; c < cols; c += 16) {
      const __m512 v0 = _mm512_loadu_ps(x0 + c);
      const __m512 v1 = x1 != nullptr ? _mm512_loadu_ps(x1 + c) : _mm512_setzero_ps();
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(v1, v0);
      _mm512_storeu_si512(o + 2 * c, _mm512_permutexvar_epi16(idx, both));
    }
  }
}

// bf16 rows src [rows][cols] (stride elements) as row pairs: dst[(r / 2) * ld
// + 2 c + r % 2] = src[r][c] (the B layout of gemm_bf16_avx512 over rows).
// The partner of an odd last row is not written.
TFA_AVX512BF16 inline void row_pairs_bf16_avx512(const uint16_t* src, int64_t stride, int64_t rows, int64_t cols,
                                                 uint16_t* dst, int64_t ld) {
  alignas(64) static constexpr uint16_t kLo[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                   8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                   24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_load_si512(kHi);
  int64_t r = 0;
  for (; r + 2 <= rows; r += 2) {
    const uint16_t* s0 = src + r * stride;
    const uint16_t* s1 = s0 + stride;
    uint16_t* d = dst + (r / 2) * ld;
    int64_t c = 0;
    for (; c + 32 <= cols; c += 32) {
      const __m512i a = _mm512_loadu_si512(s0 + c), b = _mm512_loadu_si512(s1 + c);
      _mm512_storeu_si512(d + 2 * c, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(d + 2 * c + 32, _mm512_permutex2var_epi16(a, hi, b));
    }
    for (; c < cols; ++c) {
      d[2 * c] = s0[c];
      d[2 * c + 1] = s1[c];
    }
  }
  if (r < rows) {
    const uint16_t* s0 = src + r * stride;
    uint16_t* d = dst + (r / 2) * ld;
    for (int64_t c = 0; c < cols; ++c) d[2 * c] = s0[c];
  }
}

// bf16 rows src [rows][cols] (stride elements) transposed into column pairs:
// dst[(c / 2) * ld + 2 r + c % 2] = src[r][c], i.e. the 32-bit word (src[r][2p],
// src[r][2p + 1]) goes to dst + p * ld + 2 r (the B layout of
// gemm_bf16_avx512 over the columns). 16 rows per gather. With odd cols the
// partner of the last column is not written. Needs (rows - 1) * stride +
// cols < 2^31 (the gather's 32-bit indices).
TFA_AVX512BF16 inline void pairs_t_bf16_avx512(const uint16_t* src, int64_t stride, int64_t rows, int64_t cols,
                                               uint16_t* dst, int64_t ld) {
  const int64_t whole = cols / 2;  // complete pairs
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const __mmask16 mk = tail_mask(rows - r0);
    const __m512i idx = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(stride)));
    const uint16_t* base = src + r0 * stride;
    for (int64_t p = 0; p < whole; ++p) {
      const __m512i w = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mk, idx, base + 2 * p, 2);
      _mm512_mask_storeu_epi32(dst + p * ld + 2 * r0, mk, w);
    }
  }
  if (cols % 2 != 0) {
    for (int64_t r = 0; r < rows; ++r) dst[whole * ld + 2 * r] = src[r * stride + cols - 1];
  }
}

// out[i] = bf16(x[i]), round to nearest even (vcvtneps2bf16).
TFA_AVX512BF16 inline void to_bf16_avx512(const float* x, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mk = tail_mask(n - i);
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, x + i));
    _mm256_mask_storeu_epi16(out + i, mk, h);
  }
}

// ---------------------------------------------------------------------------
// AMX-BF16 tier: the same products (B pair-interleaved, as tdpbf16ps wants
// it) on the tile unit. C blocks of 32 x 32 in four 16 x 16 float tiles,
// A as two 16-row x 16-pair tiles, B as two 16-pair x 16-column tiles; the
// rows past a multiple of 16 and the pairs past a multiple of 16 go through
// the AVX512-BF16 kernel. tdpbf16ps multiplies bf16 pairs exactly and adds
// them to float32 accumulators (denormals flushed). The tile configuration is
// loaded on entry and released on exit of every call: other code on the same
// thread (oneDNN's matrix products) configures the tiles its own way.

#define TFA_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512dq,avx512vl,avx512bw,avx512bf16,fma")))

struct alignas(64) AmxTileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// C tiles 0-3, A tiles 4-5, B tiles 6-7; all 16 rows x 64 bytes.
TFA_AMX inline void amx_block(int64_t kp16, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float* c,
                              int64_t ldc, bool accumulate, int mt, int nt) {
  // mt, nt: 1 or 2 tiles of 16 rows / 16 columns.
  const int64_t sa = lda * 2, sb = ldb * 2, sc = ldc * 4;  // strides in bytes
  if (accumulate) {
    _tile_loadd(0, c, sc);
    if (nt > 1) _tile_loadd(1, c + 16, sc);
    if (mt > 1) _tile_loadd(2, c + 16 * ldc, sc);
    if (mt > 1 && nt > 1) _tile_loadd(3, c + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t p = 0; p < kp16; p += 16) {
    _tile_loadd(4, a + 2 * p, sa);
    _tile_loadd(6, b + p * ldb, sb);
    _tile_dpbf16ps(0, 4, 6);
    if (nt > 1) {
      _tile_loadd(7, b + p * ldb + 32, sb);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (mt > 1) {
      _tile_loadd(5, a + 16 * lda + 2 * p, sa);
      _tile_dpbf16ps(2, 5, 6);
      if (nt > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, sc);
  if (nt > 1) _tile_stored(1, c + 16, sc);
  if (mt > 1) _tile_stored(2, c + 16 * ldc, sc);
  if (mt > 1 && nt > 1) _tile_stored(3, c + 16 * ldc + 16, sc);
}

// C[m][n] (+)= A[m][2 kp] * B[2 kp][n], as gemm_bf16_avx512.
TFA_AMX inline void gemm_bf16_amx(int64_t m, int64_t n, int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* b,
                                  int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  const int64_t m16 = m / 16 * 16, kp16 = kp / 16 * 16;
  if (m16 == 0 || kp16 == 0) {  // no whole tile
    gemm_bf16_avx512(m, n, kp, a, lda, b, ldb, c, ldc, accumulate);
    return;
  }
  AmxTileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  for (int64_t i = 0; i < m16; i += 32) {
    const int mt = m16 - i >= 32 ? 2 : 1;
    for (int64_t j = 0; j < n; j += 32) {
      const int nt = n - j >= 32 ? 2 : 1;
      amx_block(kp16, a + i * lda, lda, b + 2 * j, ldb, c + i * ldc + j, ldc, accumulate, mt, nt);
    }
  }
  _tile_release();
  // The pairs past kp16, added to the rows just computed; then the rows past m16.
  if (kp16 < kp) gemm_bf16_avx512(m16, n, kp - kp16, a + 2 * kp16, lda, b + kp16 * ldb, ldb, c, ldc, true);
  if (m16 < m) gemm_bf16_avx512(m - m16, n, kp, a + m16 * lda, lda, b, ldb, c + m16 * ldc, ldc, accumulate);
}

#undef TFA_AMX

// Whether this CPU has AMX-BF16 and the OS lets this process use the tiles
// (Linux asks each process to request the tile state first).
inline bool amx_bf16_usable() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amx_tile = (edx >> 24) & 1, amx_bf16 = (edx >> 22) & 1;
  if (!amx_tile || !amx_bf16) return false;
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

// ---------------------------------------------------------------------------
// AVX-512 tile copies of float32 (see CopyKernels).
TFA_AVX512 inline void copy_rows_avx512(const float* src, int64_t stride, int64_t rows, int64_t cols, float scale,
                                        float* dst, int64_t ld) {
  const __m512 sv = _mm512_set1_ps(scale);
  const __mmask16 tail = static_cast<__mmask16>((1u << (cols % 16)) - 1);
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * stride;
    float* d = dst + r * ld;
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16) _mm512_storeu_ps(d + c, _mm512_mul_ps(sv, _mm512_loadu_ps(s + c)));
    if (tail != 0) _mm512_mask_storeu_ps(d + c, tail, _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(tail, s + c)));
  }
}

// 16 x 16 blocks transposed in registers: unpacks of 32- and 64-bit pairs, then
// 128-bit lane shuffles at distances 4 and 8.
TFA_AVX512 inline void copy_transposed_avx512(const float* src, int64_t stride, int64_t rows, int64_t cols,
                                              float scale, float* dst, int64_t ld) {
  const __m512 sv = _mm512_set1_ps(scale);
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t nr = std::min<int64_t>(16, rows - r0);
    const __mmask16 rmask = static_cast<__mmask16>((1u << nr) - 1);
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int64_t nc = std::min<int64_t>(16, cols - c0);
      const __mmask16 cmask = static_cast<__mmask16>((1u << nc) - 1);
      __m512 x[16], t[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        x[i] = i < nr ? _mm512_maskz_loadu_ps(cmask, src + (r0 + i) * stride + c0) : _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(x[i], x[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(x[i], x[i + 1]);
      }
#pragma GCC unroll 4
      for (int i = 0; i < 16; i += 4) {
        x[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        x[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        x[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
        x[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
      }
#pragma GCC unroll 2
      for (int h = 0; h < 16; h += 8)
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          t[h + i] = _mm512_shuffle_f32x4(x[h + i], x[h + i + 4], 0x88);
          t[h + i + 4] = _mm512_shuffle_f32x4(x[h + i], x[h + i + 4], 0xdd);
        }
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        x[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        x[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
      }
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        if (i < nc) _mm512_mask_storeu_ps(dst + (c0 + i) * ld + r0, rmask, _mm512_mul_ps(sv, x[i]));
    }
  }
}

// ---------------------------------------------------------------------------
// Masks of a logits tile (x [nr][nc], nc <= 64): key c of row r is allowed
// when its mask byte is nonzero and lo + r <= c <= hi + r (the band of
// attention_params.h relative to the tile: lo = t0 + band.lo - s0, hi = t0 +
// band.hi - s0). The mask bytes of row r are at mask + r * row_stride, key c
// at + c * col_stride with col_stride 0 or 1; mask null: the band only. 64
// keys of a row are one byte load and one bit mask.

TFA_AVX512 inline uint64_t mask_row_bits_avx512(const bool* mrow, int64_t col_stride, uint64_t cols) {
  if (mrow == nullptr) return cols;
  if (col_stride == 0) return *mrow ? cols : 0;
  const __m512i bytes = _mm512_maskz_loadu_epi8(cols, mrow);
  return _mm512_test_epi8_mask(bytes, bytes);
}
inline uint64_t key_bits(int64_t nc) {  // keys 0 .. nc - 1 (nc <= 64)
  return nc >= 64 ? ~uint64_t(0) : (uint64_t(1) << nc) - 1;
}
inline uint64_t upto_bits(int64_t last, uint64_t cols) {  // keys 0 .. last
  return last < 0 ? 0 : last >= 63 ? cols : cols & ((uint64_t(2) << last) - 1);
}
inline uint64_t band_bits(int64_t lo, int64_t hi, uint64_t cols) {  // keys lo .. hi
  return upto_bits(hi, cols) & ~upto_bits(lo - 1, cols);
}

// Whether any entry of the tile is allowed.
TFA_AVX512 inline bool mask_tile_any_avx512(const bool* mask, int64_t row_stride, int64_t col_stride, int64_t lo,
                                            int64_t hi, int64_t nr, int64_t nc) {
  if (nr <= 0 || nc <= 0) return false;
  const uint64_t cols = key_bits(nc);
  // Rows sharing their bytes (row_stride 0, or no mask): their bands' union
  // against the bytes once.
  if (mask == nullptr || row_stride == 0) {
    return (mask_row_bits_avx512(mask, col_stride, cols) & band_bits(lo, hi + nr - 1, cols)) != 0;
  }
  for (int64_t r = 0; r < nr; ++r) {
    if ((mask_row_bits_avx512(mask + r * row_stride, col_stride, cols) & band_bits(lo + r, hi + r, cols)) != 0)
      return true;
  }
  return false;
}

// Sets the disallowed entries to -inf.
TFA_AVX512 inline void mask_tile_avx512(const bool* mask, int64_t row_stride, int64_t col_stride, int64_t lo,
                                        int64_t hi, int64_t nr, int64_t nc, float* x, int64_t ld) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const uint64_t cols = key_bits(nc);
  // Rows sharing their bytes (row_stride 0, or no mask) read them once.
  const bool shared = mask == nullptr || row_stride == 0;
  const uint64_t shared_keep = shared ? mask_row_bits_avx512(mask, col_stride, cols) : 0;
  for (int64_t r = 0; r < nr; ++r) {
    uint64_t keep = shared ? shared_keep : mask_row_bits_avx512(mask + r * row_stride, col_stride, cols);
    keep &= band_bits(lo + r, hi + r, cols);
    const uint64_t drop = cols & ~keep;
    if (drop == 0) continue;
    float* xr = x + r * ld;
    for (int64_t c = 0; c < nc; c += 16)
      _mm512_mask_storeu_ps(xr + c, static_cast<__mmask16>(drop >> c), neg_inf);
  }
}

// ---- soft-capping -----------------------------------------------------------

// tanh(y) for 16 floats, within 2 ulp: for |y| < 0.625 the odd polynomial
// y + y z P(z), z = y^2, P of degree 4 (a least-squares fit to tanh(y)/y on
// that interval, weighted for relative error; 0.8 ulp in float32 arithmetic);
// above, sign(y) (1 - 2 / (exp(2|y|) + 1)) with exp_avx512 (exp's clamp gives
// exactly +-1 for |y| >= 44 and for +-inf). NaN stays NaN (the polynomial).
TFA_AVX512 inline __m512 tanh_avx512(__m512 y) {
  const __m512 a = _mm512_abs_ps(y);
  const __m512 z = _mm512_mul_ps(y, y);
  __m512 p = _mm512_set1_ps(-5.729912315e-03f);
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(2.065595798e-02f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-5.374261737e-02f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.333143711e-01f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-3.333328068e-01f));
  const __m512 small = _mm512_fmadd_ps(y, _mm512_mul_ps(z, p), y);
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = exp_avx512(_mm512_add_ps(a, a));
  const __m512 big = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, one)));
  const __m512 sign = _mm512_and_ps(y, _mm512_set1_ps(-0.0f));
  const __mmask16 use_big = _mm512_cmp_ps_mask(a, _mm512_set1_ps(0.625f), _CMP_GE_OQ);
  return _mm512_mask_blend_ps(use_big, small, _mm512_or_ps(big, sign));
}

// tanh(y) for 16 floats, within 7 ulp (4e-7 absolute): y P(z) / Q(z), z =
// y^2, P of degree 5 and Q of degree 3 (a least-squares fit of the relative
// error on [0, 9], linearised and reweighted), with y clamped to [-9, 9]
// (tanh rounds to +-1 beyond) and the result to [-1, 1]. NaN stays NaN (the
// clamps return their second operand for NaN). 11 operations against
// tanh_avx512's ~30.
TFA_AVX512 inline __m512 tanh_rational_avx512(__m512 y) {
  const __m512 one = _mm512_set1_ps(1.0f), lim = _mm512_set1_ps(9.0f);
  y = _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), lim), _mm512_min_ps(lim, y));
  const __m512 z = _mm512_mul_ps(y, y);
  __m512 p = _mm512_set1_ps(2.0267464790e-11f);
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-1.3607944993e-08f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(9.5551986306e-06f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(2.9531402979e-03f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.2949641049e-01f));
  p = _mm512_fmadd_ps(p, z, one);
  __m512 q = _mm512_set1_ps(2.3252658139e-04f);
  q = _mm512_fmadd_ps(q, z, _mm512_set1_ps(2.3896614090e-02f));
  q = _mm512_fmadd_ps(q, z, _mm512_set1_ps(4.6282958984e-01f));
  q = _mm512_fmadd_ps(q, z, one);
  const __m512 t = _mm512_div_ps(_mm512_mul_ps(y, p), q);
  return _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), one), _mm512_min_ps(one, t));
}

// x = cap * tanh(x / cap) on rows r < nr, columns c < nc (ld apart); with d
// set, d[r * ld + c] = 1 - tanh^2 (the derivative, for the backward). x / cap
// is formed as x * (1 / cap) (within 1.5 ulp of the quotient): a division
// per vector was about a third of the soft-cap's cost.
template <bool kRational>
TFA_AVX512 inline void soft_cap_avx512(int64_t nr, int64_t nc, float* x, int64_t ld, float cap, float* d) {
  const __m512 vc = _mm512_set1_ps(cap), inv = _mm512_set1_ps(1.0f / cap), one = _mm512_set1_ps(1.0f);
  for (int64_t r = 0; r < nr; ++r) {
    float* xr = x + r * ld;
    for (int64_t c = 0; c < nc; c += 16) {
      const __mmask16 mk = tail_mask(nc - c);
      const __m512 y = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, xr + c), inv);
      const __m512 t = kRational ? tanh_rational_avx512(y) : tanh_avx512(y);
      _mm512_mask_storeu_ps(xr + c, mk, _mm512_mul_ps(t, vc));
      if (d != nullptr) _mm512_mask_storeu_ps(d + r * ld + c, mk, _mm512_fnmadd_ps(t, t, one));
    }
  }
}

#undef TFA_AVX512BF16
#undef TFA_AVX512

// ---------------------------------------------------------------------------
// AVX2 tier (float32; bitwise the AVX-512 tier's results).
#include "attention_avx2.h"

#pragma GCC diagnostic pop
#endif  // TFA_HAVE_X86_DISPATCH

// The float32 micro-kernel tier in use: the best one this CPU has, capped by
// TF_FASTATTN_CPU_ISA ("avx512", "avx2" or "portable"; other values are
// ignored, and tf_fastattn warns about them). Decided once per process.
enum class CpuTier { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* cpu_tier_name(CpuTier t) {
  switch (t) {
    case CpuTier::kAvx512: return "avx512";
    case CpuTier::kAvx2: return "avx2";
    default: return "portable";
  }
}

// Every tier, best first: the values TF_FASTATTN_CPU_ISA takes (_C exposes
// them as CPU_ISA_VALUES for the Python side's check).
constexpr CpuTier kCpuTiers[] = {CpuTier::kAvx512, CpuTier::kAvx2, CpuTier::kPortable};

inline CpuTier cpu_tier_cap(const char* env) {
  if (env == nullptr) return CpuTier::kAvx512;
  for (CpuTier t : kCpuTiers) {
    if (std::strcmp(env, cpu_tier_name(t)) == 0) return t;
  }
  return CpuTier::kAvx512;
}

// What this CPU offers the kernels: the one detection behind every dispatch
// decision and behind build_info()'s cpu_features.
struct CpuFeatures {
  bool avx2 = false, fma = false;
  bool avx512 = false;  // F, DQ, BW and VL
  bool avx512bf16 = false;
};

inline const CpuFeatures& cpu_features() {
  static const CpuFeatures f = [] {
    CpuFeatures c;
#if TFA_HAVE_X86_DISPATCH
    c.avx2 = __builtin_cpu_supports("avx2");
    c.fma = __builtin_cpu_supports("fma");
    c.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    c.avx512bf16 = c.avx512 && __builtin_cpu_supports("avx512bf16");
#endif
    return c;
  }();
  return f;
}

inline CpuTier cpu_tier() {
  static const CpuTier tier = [] {
    const CpuFeatures& f = cpu_features();
    const CpuTier best = f.avx512 && f.fma ? CpuTier::kAvx512 : f.avx2 && f.fma ? CpuTier::kAvx2 : CpuTier::kPortable;
    return std::min(best, cpu_tier_cap(std::getenv("TF_FASTATTN_CPU_ISA")));
  }();
  return tier;
}

struct Bf16Kernels {
  void (*gemm)(int64_t m, int64_t n, int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb,
               float* c, int64_t ldc, bool accumulate);
  void (*to_bf16)(const float* x, int64_t n, uint16_t* out);
  // gemm_bf16_tn_avx512 (also where gemm runs on AMX tiles: A's layout is not a tile's).
  void (*gemm_tn)(int64_t m, int64_t n, int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb,
                  float* c, int64_t ldc);
  // pair_rows_bf16_avx512, row_pairs_bf16_avx512, pairs_t_bf16_avx512: the
  // operand layouts of the products above.
  void (*pair_rows)(const float* x, int64_t ldx, int64_t rows, int64_t cols, uint16_t* out, int64_t ldo);
  void (*row_pairs)(const uint16_t* src, int64_t stride, int64_t rows, int64_t cols, uint16_t* dst, int64_t ld);
  void (*pairs_t)(const uint16_t* src, int64_t stride, int64_t rows, int64_t cols, uint16_t* dst, int64_t ld);
};

// Whether environment variable `env`'s value turns a flag off: 0, false, no
// or off in any case (tf_fastattn/_env.py, which refuses other words at import).
inline bool env_says_off(const char* env) {
  if (env == nullptr) return false;
  std::string v(env);
  for (char& c : v) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return v == "0" || v == "false" || v == "no" || v == "off";
}

// Whether the bf16 products run on AMX tiles: the CPU has AMX-BF16 and
// AVX512-BF16, the OS granted the tile state, and TF_FASTATTN_CPU_AMX does not
// say off. Decided once per process.
inline bool amx_enabled() {
#if TFA_HAVE_X86_DISPATCH
  static const bool on = [] {
    if (env_says_off(std::getenv("TF_FASTATTN_CPU_AMX"))) return false;
    return cpu_tier() == CpuTier::kAvx512 && cpu_features().avx512bf16 && amx_bf16_usable();
  }();
  return on;
#else
  return false;
#endif
}

// The bf16 tile products, or null where the CPU lacks AVX512-BF16 (the
// kernels then convert bfloat16 to float32 and use the float32 products).
inline const Bf16Kernels* bf16_kernels() {
#if TFA_HAVE_X86_DISPATCH
  static const Bf16Kernels avx512 = {gemm_bf16_avx512, to_bf16_avx512, gemm_bf16_tn_avx512, pair_rows_bf16_avx512,
                                     row_pairs_bf16_avx512, pairs_t_bf16_avx512};
  static const Bf16Kernels amx = {gemm_bf16_amx, to_bf16_avx512, gemm_bf16_tn_avx512, pair_rows_bf16_avx512,
                                  row_pairs_bf16_avx512, pairs_t_bf16_avx512};
  static const bool ok = cpu_tier() == CpuTier::kAvx512 && cpu_features().avx512bf16;
  if (ok) return amx_enabled() ? &amx : &avx512;
#endif
  return nullptr;
}

// The head-dim products (logits = q k^T, dP = dO V^T) computed from the
// inputs' raw bfloat16 bits, for input type T: chosen here, at the boundary,
// so that the attention drivers never branch on the dtype. `gemm` is set only
// for bfloat16 inputs on a CPU with AVX512-BF16 (on AMX tiles where usable,
// see bf16_kernels); otherwise it is null and the drivers multiply converted
// float tiles with MicroKernels::gemm. A and B as in Bf16Kernels::gemm.
//
// With gemm set, the backward's other products (P^T dO, dS^T Q, dS K) also
// run on bf16 operands: P and dS rounded to bfloat16 (as the plain bfloat16
// math stores them), q, dO and k from their bits. The other members as in
// Bf16Kernels, set together with gemm.
template <typename Acc>
struct RawProducts {
  void (*gemm)(int64_t m, int64_t n, int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb,
               Acc* c, int64_t ldc, bool accumulate) = nullptr;
  void (*gemm_tn)(int64_t m, int64_t n, int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb,
                  Acc* c, int64_t ldc) = nullptr;
  void (*pair_rows)(const Acc* x, int64_t ldx, int64_t rows, int64_t cols, uint16_t* out, int64_t ldo) = nullptr;
  void (*to_bf16)(const Acc* x, int64_t n, uint16_t* out) = nullptr;
  void (*row_pairs)(const uint16_t* src, int64_t stride, int64_t rows, int64_t cols, uint16_t* dst,
                    int64_t ld) = nullptr;
  void (*pairs_t)(const uint16_t* src, int64_t stride, int64_t rows, int64_t cols, uint16_t* dst,
                  int64_t ld) = nullptr;
};

template <typename T>
inline RawProducts<typename AccType<T>::type> raw_products() {
  return {};
}
template <>
inline RawProducts<float> raw_products<bfloat16_t>() {
  RawProducts<float> r;
  if (const Bf16Kernels* bk = bf16_kernels()) {
    r.gemm = bk->gemm;
    r.gemm_tn = bk->gemm_tn;
    r.pair_rows = bk->pair_rows;
    r.to_bf16 = bk->to_bf16;
    r.row_pairs = bk->row_pairs;
    r.pairs_t = bk->pairs_t;
  }
  return r;
}

// Whether the backward forms dS with MicroKernels::ds_wide (dP summed in
// float64) for input type T: float32 inputs, where the float32 dP's rounding
// exceeded the accuracy criterion's floor (see BwdTile in attention.cc); half
// types have larger floors, float64 inputs accumulate in float64 anyway.
template <typename T>
constexpr bool wide_ds() {
  return std::is_same<T, float>::value;
}

// The vectorised tile masks (see mask_tile_avx512), or null below the
// AVX-512 tier (the kernels then test entry by entry; masks are exact either way).
struct MaskKernels {
  bool (*any)(const bool* mask, int64_t row_stride, int64_t col_stride, int64_t lo, int64_t hi, int64_t nr,
              int64_t nc);
  void (*apply)(const bool* mask, int64_t row_stride, int64_t col_stride, int64_t lo, int64_t hi, int64_t nr,
                int64_t nc, float* x, int64_t ld);
};
inline const MaskKernels* mask_kernels() {
#if TFA_HAVE_X86_DISPATCH
  static const MaskKernels avx512 = {mask_tile_any_avx512, mask_tile_avx512};
  if (cpu_tier() == CpuTier::kAvx512) return &avx512;
#endif
  return nullptr;
}

// Dropout of rows t0 .. t0 + nr - 1 x keys s0 .. s0 + nc - 1 (see
// dropout_tile_avx512), or null on the portable tier (the kernels then call
// philox.h's generator once per 4 keys).
using DropoutTileFn = void (*)(uint64_t seed, uint32_t threshold, float kept, uint32_t b, uint32_t n, uint32_t t0,
                               int64_t nr, int64_t s0, int64_t nc, float* out, int64_t ld, bool apply);
inline DropoutTileFn dropout_tile_kernel() {
#if TFA_HAVE_X86_DISPATCH
  switch (cpu_tier()) {
    case CpuTier::kAvx512: return dropout_tile_avx512;
    case CpuTier::kAvx2: return dropout_tile_avx2;
    default: break;
  }
#endif
  return nullptr;
}

// Tile copies of float32: dst[r * ld + c] (rows) or dst[c * ld + r]
// (transposed) = scale * src[r * stride + c] for r < rows, c < cols; nothing
// else of dst is written. One rounding (of the product), so they give the bits
// of the plain loops they replace. The kernels read q, k, v, dO and write o,
// dq, dk, dv this way; as plain loops (SSE2 in the baseline build, the
// transposes a column at a time) those copies took about a tenth of a float32
// forward + backward at head dim 256. Null below the AVX-512 tier (the
// kernels keep the plain loops).
struct CopyKernels {
  void (*rows)(const float* src, int64_t stride, int64_t rows, int64_t cols, float scale, float* dst, int64_t ld);
  void (*transposed)(const float* src, int64_t stride, int64_t rows, int64_t cols, float scale, float* dst,
                     int64_t ld);
};
inline const CopyKernels* copy_kernels() {
#if TFA_HAVE_X86_DISPATCH
  static const CopyKernels avx512 = {copy_rows_avx512, copy_transposed_avx512};
  if (cpu_tier() == CpuTier::kAvx512) return &avx512;
#endif
  return nullptr;
}

template <>
inline const MicroKernels<float>& micro_kernels<float>() {
#if TFA_HAVE_X86_DISPATCH
  static const MicroKernels<float> avx512 = {gemm_avx512<false>, gemm_avx512<true>, exp_shift_sum_avx512,
                                             ds_wide_avx512,     softmax_step_avx512, soft_cap_avx512<false>,
                                             soft_cap_avx512<true>, ds_narrow_avx512};
  static const MicroKernels<float> avx2 = {gemm_avx2<false>, gemm_avx2<true>, exp_shift_sum_avx2, ds_wide_avx2,
                                           softmax_step_avx2,  soft_cap_avx2<false>, soft_cap_avx2<true>};
  switch (cpu_tier()) {
    case CpuTier::kAvx512: return avx512;
    case CpuTier::kAvx2: return avx2;
    default: break;
  }
#endif
  return portable_kernels<float>();
}

}  // namespace cpu
}  // namespace tf_fastattn
