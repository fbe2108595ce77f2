// AVX2 tier of the CPU attention's float32 micro-kernels (CPUs with AVX2 and
// FMA but without AVX-512: most AMD Zen 1-3 and Intel client parts).
//
// Each kernel does the AVX-512 tier's arithmetic in the same order, on two
// 8-lane halves where that tier has one 16-lane vector: the same FMAs per
// element over the same k order, exp with the same polynomial and the same
// single rounding of the 2^n scaling, and horizontal sums and maxima reduced
// in the same tree as GCC's _mm512_reduce_*_ps. Float32 outputs are therefore
// bitwise identical on both tiers (tests/test_cpu_tiers.py checks it).
//
// Included by attention_microkernels.h inside its x86 section (it relies on
// that header's includes, kKc and the Philox constants).
#pragma once

#define TFA_AVX2 __attribute__((target("avx2,fma")))

// Lanes i < remaining of 8 (all of them when remaining >= 8), as the sign
// bits that vmaskmovps reads.
TFA_AVX2 inline __m256i tail_mask8(int64_t remaining) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int r = static_cast<int>(std::min<int64_t>(remaining, 8));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(r), lane);
}

// ---- C[m][n] (+)= A[m][k] B[k][n] (A transposed when TRANS_A) ------------

// One MR x 16 block of C: 2 MR accumulators, 2 B vectors and one broadcast
// of A in the 16 ymm registers (MR = 6 uses 15).
template <int MR, bool TRANS_A>
TFA_AVX2 inline void gemm_block_avx2(int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                                     int64_t ldc, GemmInto into) {
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (int j = 0; j < 2; ++j)
      acc[i][j] = into == GemmInto::kChain ? _mm256_loadu_ps(c + i * ldc + 8 * j) : _mm256_setzero_ps();
  for (int64_t p = 0; p < k; ++p) {
    const __m256 b0 = _mm256_loadu_ps(b + p * ldb), b1 = _mm256_loadu_ps(b + p * ldb + 8);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(TRANS_A ? a + p * lda + i : a + i * lda + p);
      acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
    }
  }
  if (into == GemmInto::kAdd) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      acc[i][0] = _mm256_add_ps(_mm256_loadu_ps(c + i * ldc), acc[i][0]);
      acc[i][1] = _mm256_add_ps(_mm256_loadu_ps(c + i * ldc + 8), acc[i][1]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(c + i * ldc, acc[i][0]);
    _mm256_storeu_ps(c + i * ldc + 8, acc[i][1]);
  }
}

// Column panels of 16 outer (the k x 16 panel of B stays in L1), row blocks
// of 6 inner; n is a multiple of 16.
template <bool TRANS_A>
TFA_AVX2 inline void gemm_avx2(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                               int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  const int64_t row_step = TRANS_A ? 1 : lda;
  for_each_k_chunk(k, accumulate, [&](int64_t k0, int64_t kc, GemmInto into) TFA_AVX2 {
    const float* ak = TRANS_A ? a + k0 * lda : a + k0;
    const float* bk = b + k0 * ldb;
    for (int64_t j = 0; j < n; j += 16) {
      int64_t i = 0;
      for (; i + 6 <= m; i += 6)
        gemm_block_avx2<6, TRANS_A>(kc, ak + i * row_step, lda, bk + j, ldb, c + i * ldc + j, ldc, into);
      const float* ai = ak + i * row_step;
      float* ci = c + i * ldc + j;
      switch (m - i) {
        case 5: gemm_block_avx2<5, TRANS_A>(kc, ai, lda, bk + j, ldb, ci, ldc, into); break;
        case 4: gemm_block_avx2<4, TRANS_A>(kc, ai, lda, bk + j, ldb, ci, ldc, into); break;
        case 3: gemm_block_avx2<3, TRANS_A>(kc, ai, lda, bk + j, ldb, ci, ldc, into); break;
        case 2: gemm_block_avx2<2, TRANS_A>(kc, ai, lda, bk + j, ldb, ci, ldc, into); break;
        case 1: gemm_block_avx2<1, TRANS_A>(kc, ai, lda, bk + j, ldb, ci, ldc, into); break;
        default: break;
      }
    }
  });
}

// ---- the float32 backward's dS tile (see MicroKernels::ds_wide) -----------

TFA_AVX2 inline __m256d lo_pd_avx2(__m256 x) { return _mm256_cvtps_pd(_mm256_castps256_ps128(x)); }
TFA_AVX2 inline __m256d hi_pd_avx2(__m256 x) { return _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)); }

// MR rows x 16 columns: float32 chunk sums of kKc terms (2 MR registers)
// added into float64 accumulators (4 MR registers), as the AVX-512 tier.
template <int MR>
TFA_AVX2 inline void ds_wide_block_avx2(int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                                        float* p, const float* f, const double* delta, float* ds, int64_t ldp) {
  __m256d dacc[MR][4];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) dacc[i][j] = _mm256_setzero_pd();
  for (int64_t q0 = 0; q0 < k; q0 += kKc) {
    const int64_t q1 = std::min<int64_t>(k, q0 + kKc);
    __m256 acc[MR][2];
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t q = q0; q < q1; ++q) {
      const __m256 b0 = _mm256_loadu_ps(b + q * ldb), b1 = _mm256_loadu_ps(b + q * ldb + 8);
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        const __m256 av = _mm256_broadcast_ss(a + i * lda + q);
        acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      dacc[i][0] = _mm256_add_pd(dacc[i][0], lo_pd_avx2(acc[i][0]));
      dacc[i][1] = _mm256_add_pd(dacc[i][1], hi_pd_avx2(acc[i][0]));
      dacc[i][2] = _mm256_add_pd(dacc[i][2], lo_pd_avx2(acc[i][1]));
      dacc[i][3] = _mm256_add_pd(dacc[i][3], hi_pd_avx2(acc[i][1]));
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) {
    const __m256d dl = _mm256_set1_pd(delta[i]);
#pragma GCC unroll 2
    for (int j = 0; j < 2; ++j) {
      const int64_t off = i * ldp + 8 * j;
      const __m256 pv = _mm256_loadu_ps(p + off);
      __m256d xlo, xhi;
      if (f != nullptr) {
        const __m256 fv = _mm256_loadu_ps(f + off);
        xlo = _mm256_fmsub_pd(lo_pd_avx2(fv), dacc[i][2 * j], dl);
        xhi = _mm256_fmsub_pd(hi_pd_avx2(fv), dacc[i][2 * j + 1], dl);
        _mm256_storeu_ps(p + off, _mm256_mul_ps(pv, fv));
      } else {
        xlo = _mm256_sub_pd(dacc[i][2 * j], dl);
        xhi = _mm256_sub_pd(dacc[i][2 * j + 1], dl);
      }
      _mm_storeu_ps(ds + off, _mm256_cvtpd_ps(_mm256_mul_pd(lo_pd_avx2(pv), xlo)));
      _mm_storeu_ps(ds + off + 4, _mm256_cvtpd_ps(_mm256_mul_pd(hi_pd_avx2(pv), xhi)));
    }
  }
}

TFA_AVX2 inline void ds_wide_avx2(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                                  int64_t ldb, float* p, const float* f, const double* delta, float* ds,
                                  int64_t ldp) {
  for (int64_t j = 0; j < n; j += 16) {
    const float* fj = f != nullptr ? f + j : nullptr;
    int64_t i = 0;
    for (; i + 2 <= m; i += 2)
      ds_wide_block_avx2<2>(k, a + i * lda, lda, b + j, ldb, p + i * ldp + j, fj ? fj + i * ldp : nullptr,
                            delta + i, ds + i * ldp + j, ldp);
    if (i < m)
      ds_wide_block_avx2<1>(k, a + i * lda, lda, b + j, ldb, p + i * ldp + j, fj ? fj + i * ldp : nullptr,
                            delta + i, ds + i * ldp + j, ldp);
  }
}

// ---- exp, row maxima and sums ---------------------------------------------

// exp_avx512 on 8 lanes: the same clamp, reduction and polynomial; 2^n
// applied as two exact power-of-two factors (n = n1 + n2, both within the
// normal exponent range) so that, as vscalefps, the result is rounded once
// (to a subnormal or to 0 below the normal range).
TFA_AVX2 inline __m256 pow2i_avx2(__m256i n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
}

TFA_AVX2 inline __m256 exp_avx2(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-104.0f), x);  // NaN stays NaN, as exp_avx512
  x = _mm256_min_ps(_mm256_set1_ps(88.7228f), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i ni = _mm256_cvtps_epi32(n);           // -150 .. 128
  const __m256i n1 = _mm256_srai_epi32(ni, 1);         // floor(n / 2): -75 .. 64
  const __m256i n2 = _mm256_sub_epi32(ni, n1);         // -75 .. 64
  return _mm256_mul_ps(_mm256_mul_ps(p, pow2i_avx2(n1)), pow2i_avx2(n2));
}

// tanh_avx512 on 8 lanes: the same polynomial, exp and blend, so the same bits.
TFA_AVX2 inline __m256 tanh_avx2(__m256 y) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  const __m256 a = _mm256_andnot_ps(sign_bit, y);
  const __m256 z = _mm256_mul_ps(y, y);
  __m256 p = _mm256_set1_ps(-5.729912315e-03f);
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.065595798e-02f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.374261737e-02f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.333143711e-01f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.333328068e-01f));
  const __m256 small = _mm256_fmadd_ps(y, _mm256_mul_ps(z, p), y);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 e = exp_avx2(_mm256_add_ps(a, a));
  const __m256 big = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, one)));
  const __m256 use_big = _mm256_cmp_ps(a, _mm256_set1_ps(0.625f), _CMP_GE_OQ);
  return _mm256_blendv_ps(small, _mm256_or_ps(big, _mm256_and_ps(y, sign_bit)), use_big);
}

// tanh_rational_avx512 on 8 lanes (the same clamps, polynomials and division).
TFA_AVX2 inline __m256 tanh_rational_avx2(__m256 y) {
  const __m256 one = _mm256_set1_ps(1.0f), lim = _mm256_set1_ps(9.0f);
  y = _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), lim), _mm256_min_ps(lim, y));
  const __m256 z = _mm256_mul_ps(y, y);
  __m256 p = _mm256_set1_ps(2.0267464790e-11f);
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-1.3607944993e-08f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(9.5551986306e-06f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.9531402979e-03f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.2949641049e-01f));
  p = _mm256_fmadd_ps(p, z, one);
  __m256 q = _mm256_set1_ps(2.3252658139e-04f);
  q = _mm256_fmadd_ps(q, z, _mm256_set1_ps(2.3896614090e-02f));
  q = _mm256_fmadd_ps(q, z, _mm256_set1_ps(4.6282958984e-01f));
  q = _mm256_fmadd_ps(q, z, one);
  const __m256 t = _mm256_div_ps(_mm256_mul_ps(y, p), q);
  return _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), one), _mm256_min_ps(one, t));
}

// soft_cap_avx512 on 8 lanes.
template <bool kRational>
TFA_AVX2 inline void soft_cap_avx2(int64_t nr, int64_t nc, float* x, int64_t ld, float cap, float* d) {
  const __m256 vc = _mm256_set1_ps(cap), inv = _mm256_set1_ps(1.0f / cap), one = _mm256_set1_ps(1.0f);
  for (int64_t r = 0; r < nr; ++r) {
    float* xr = x + r * ld;
    for (int64_t c = 0; c < nc; c += 8) {
      const __m256i mk = tail_mask8(nc - c);
      const __m256 y = _mm256_mul_ps(_mm256_maskload_ps(xr + c, mk), inv);
      const __m256 t = kRational ? tanh_rational_avx2(y) : tanh_avx2(y);
      _mm256_maskstore_ps(xr + c, mk, _mm256_mul_ps(t, vc));
      if (d != nullptr) _mm256_maskstore_ps(d + r * ld + c, mk, _mm256_fnmadd_ps(t, t, one));
    }
  }
}

// GCC's _mm512_reduce_{max,add}_ps tree on the 16 lanes lo (0-7), hi (8-15).
TFA_AVX2 inline float reduce_add16_avx2(__m256 lo, __m256 hi) {
  const __m256 t3 = _mm256_add_ps(hi, lo);
  const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
  const __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(t8) + _mm_cvtss_f32(_mm_shuffle_ps(t8, t8, 1));
}
TFA_AVX2 inline float reduce_max16_avx2(__m256 lo, __m256 hi) {
  const __m256 t3 = _mm256_max_ps(hi, lo);
  const __m128 t6 = _mm_max_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
  const __m128 t8 = _mm_max_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
  return std::max(_mm_cvtss_f32(t8), _mm_cvtss_f32(_mm_shuffle_ps(t8, t8, 1)));
}

// Whole 16-lane blocks without masks (AMD's vmaskmovps stores are slow),
// then the tail with them.
TFA_AVX2 inline float row_max_avx2(const float* x, int64_t n) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 lo = neg_inf, hi = neg_inf;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    lo = _mm256_max_ps(lo, _mm256_loadu_ps(x + i));
    hi = _mm256_max_ps(hi, _mm256_loadu_ps(x + i + 8));
  }
  if (i < n) {
    const __m256i m0 = tail_mask8(n - i), m1 = tail_mask8(n - i - 8);
    lo = _mm256_max_ps(lo, _mm256_blendv_ps(neg_inf, _mm256_maskload_ps(x + i, m0), _mm256_castsi256_ps(m0)));
    hi = _mm256_max_ps(hi, _mm256_blendv_ps(neg_inf, _mm256_maskload_ps(x + i + 8, m1), _mm256_castsi256_ps(m1)));
  }
  return reduce_max16_avx2(lo, hi);
}

TFA_AVX2 inline float exp_shift_sum_avx2(float* x, int64_t n, float shift) {
  const __m256 s = _mm256_set1_ps(shift);
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 e0 = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), s));
    const __m256 e1 = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), s));
    _mm256_storeu_ps(x + i, e0);
    _mm256_storeu_ps(x + i + 8, e1);
    lo = _mm256_add_ps(lo, e0);
    hi = _mm256_add_ps(hi, e1);
  }
  if (i < n) {  // masked lanes add 0, as the AVX-512 tier's masked add keeps them
    const __m256i m0 = tail_mask8(n - i), m1 = tail_mask8(n - i - 8);
    const __m256 e0 = _mm256_and_ps(exp_avx2(_mm256_sub_ps(_mm256_maskload_ps(x + i, m0), s)), _mm256_castsi256_ps(m0));
    const __m256 e1 =
        _mm256_and_ps(exp_avx2(_mm256_sub_ps(_mm256_maskload_ps(x + i + 8, m1), s)), _mm256_castsi256_ps(m1));
    _mm256_maskstore_ps(x + i, m0, e0);
    _mm256_maskstore_ps(x + i + 8, m1, e1);
    lo = _mm256_add_ps(lo, e0);
    hi = _mm256_add_ps(hi, e1);
  }
  return reduce_add16_avx2(lo, hi);
}

// softmax_step_avx512's arithmetic, with its one-pass path for full 64-column
// rows (8 registers of logits held between the maximum and the exponentials).
TFA_AVX2 inline void softmax_step_avx2(int64_t nr, int64_t nc, float* s, int64_t lds, float* m, float* l, float* acc,
                                       int64_t ldacc, int64_t hv) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < nr; ++r) {
    float* sr = s + r * lds;
    float m_new, rsum;
    if (nc == 64) {
      __m256 x[8];
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) x[j] = _mm256_loadu_ps(sr + 8 * j);
      // Lanes 0-7 of each 16-lane block in even registers, 8-15 in odd ones.
      const __m256 lo = _mm256_max_ps(_mm256_max_ps(x[0], x[2]), _mm256_max_ps(x[4], x[6]));
      const __m256 hi = _mm256_max_ps(_mm256_max_ps(x[1], x[3]), _mm256_max_ps(x[5], x[7]));
      m_new = std::max(m[r], reduce_max16_avx2(lo, hi));
      if (m_new == neg_inf) {
        if (!has_nan(sr, nc)) {
          std::fill(sr, sr + nc, 0.0f);
          continue;
        }
        m_new = std::numeric_limits<float>::quiet_NaN();
      }
      const __m256 sh = _mm256_set1_ps(m_new);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        x[j] = exp_avx2(_mm256_sub_ps(x[j], sh));
        _mm256_storeu_ps(sr + 8 * j, x[j]);
      }
      rsum = reduce_add16_avx2(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(x[0], x[2]), x[4]), x[6]),
                               _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(x[1], x[3]), x[5]), x[7]));
    } else {
      m_new = std::max(m[r], row_max_avx2(sr, nc));
      if (m_new == neg_inf) {
        if (!has_nan(sr, nc)) {
          std::fill(sr, sr + nc, 0.0f);
          continue;
        }
        m_new = std::numeric_limits<float>::quiet_NaN();
      }
      rsum = exp_shift_sum_avx2(sr, nc, m_new);
    }
    const float corr = m_new == m[r] ? 1.0f : std::exp(m[r] - m_new);
    float lc = l[r] * corr;  // rounded product, then the sum: no FMA contraction
    __asm__("" : "+x"(lc));
    l[r] = lc + rsum;
    m[r] = m_new;
    if (corr != 1.0f) {
      float* ar = acc + r * ldacc;
      const __m256 c = _mm256_set1_ps(corr);
      int64_t h = 0;
      for (; h + 8 <= hv; h += 8) _mm256_storeu_ps(ar + h, _mm256_mul_ps(c, _mm256_loadu_ps(ar + h)));
      if (h < hv) {
        const __m256i mk = tail_mask8(hv - h);
        _mm256_maskstore_ps(ar + h, mk, _mm256_mul_ps(c, _mm256_maskload_ps(ar + h, mk)));
      }
    }
  }
}

// ---- dropout (see dropout_rows_avx512): 8 counters, 32 keys per row ---------

// Low and high words of the 32 x 32-bit products a * m in all 8 lanes.
TFA_AVX2 inline void philox_mulhilo_avx2(__m256i a, __m256i m, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                         // 64-bit products of lanes 0, 2, ...
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, ...
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

template <int R>
TFA_AVX2 inline void dropout_rows_avx2(uint64_t seed, uint32_t threshold, float kept, uint32_t b, uint32_t n,
                                       uint32_t t0, int64_t s0, int64_t nc, float* out, int64_t ld, bool apply) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i thr = _mm256_set1_epi32(static_cast<int>(threshold));
  const __m256 kv = _mm256_set1_ps(kept);
  for (int64_t c = 0; c < nc; c += 32) {
    const __m256i quad = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>((s0 + c) >> 2)), lane);
    __m256i x0[R], x1[R], x2[R], x3[R];
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) {
      x0[r] = quad;
      x1[r] = _mm256_set1_epi32(static_cast<int>(t0 + r));
      x2[r] = _mm256_set1_epi32(static_cast<int>(n));
      x3[r] = _mm256_set1_epi32(static_cast<int>(b));
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0)), key1 = _mm256_set1_epi32(static_cast<int>(k1));
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r) {
        __m256i hi0, lo0, hi1, lo1;
        philox_mulhilo_avx2(x0[r], m0, &hi0, &lo0);
        philox_mulhilo_avx2(x2[r], m1, &hi1, &lo1);
        x0[r] = _mm256_xor_si256(_mm256_xor_si256(hi1, x1[r]), key0);
        x2[r] = _mm256_xor_si256(_mm256_xor_si256(hi0, x3[r]), key1);
        x1[r] = lo1;
        x3[r] = lo0;
      }
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) {
      // Word u of lane i decides key 4 i + u: transpose into key order.
      const __m256i a = _mm256_unpacklo_epi32(x0[r], x1[r]), bq = _mm256_unpacklo_epi32(x2[r], x3[r]);
      const __m256i cq = _mm256_unpackhi_epi32(x0[r], x1[r]), d = _mm256_unpackhi_epi32(x2[r], x3[r]);
      const __m256i q0 = _mm256_unpacklo_epi64(a, bq), q1 = _mm256_unpackhi_epi64(a, bq);  // lanes 0|4, 1|5
      const __m256i q2 = _mm256_unpacklo_epi64(cq, d), q3 = _mm256_unpackhi_epi64(cq, d);  // lanes 2|6, 3|7
      const __m256i w[4] = {_mm256_permute2x128_si256(q0, q1, 0x20), _mm256_permute2x128_si256(q2, q3, 0x20),
                            _mm256_permute2x128_si256(q0, q1, 0x31), _mm256_permute2x128_si256(q2, q3, 0x31)};
      float* row = out + r * ld;
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const int64_t at = c + 8 * j;
        if (at >= nc) break;
        // Unsigned w >= thr as max(w, thr) == w.
        const __m256 keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_max_epu32(w[j], thr), w[j]));
        const __m256i tail = tail_mask8(nc - at);
        const __m256 f = apply ? _mm256_and_ps(keep, _mm256_mul_ps(_mm256_maskload_ps(row + at, tail), kv))
                               : _mm256_and_ps(keep, kv);
        _mm256_maskstore_ps(row + at, tail, f);
      }
    }
  }
}

TFA_AVX2 inline void dropout_tile_avx2(uint64_t seed, uint32_t threshold, float kept, uint32_t b, uint32_t n,
                                       uint32_t t0, int64_t nr, int64_t s0, int64_t nc, float* out, int64_t ld,
                                       bool apply) {
  int64_t r = 0;
  for (; r + 2 <= nr; r += 2) dropout_rows_avx2<2>(seed, threshold, kept, b, n, t0 + r, s0, nc, out + r * ld, ld, apply);
  if (r < nr) dropout_rows_avx2<1>(seed, threshold, kept, b, n, t0 + r, s0, nc, out + r * ld, ld, apply);
}

#undef TFA_AVX2
