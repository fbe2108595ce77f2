// Fused scaled-dot-product attention (FlashAttention-style, exact).
//
// Glossary (one name per concept, in C++, Python, tests and benchmarks):
//   B batch, T seqlen_q, S seqlen_k, N num_heads, Nkv num_heads_kv,
//   H head_dim (q, k), Hv head_dim_v (v, o), g = N / Nkv query heads per kv head
//   q query [B, T, N, H]      k key [B, S, Nkv, H]     v value [B, S, Nkv, Hv]
//   o out [B, T, N, Hv]       lse log-sum-exp [B, N, T] (+inf: no allowed key)
//   do d_out (upstream gradient of o; `do_` in C++), dq dk dv gradients
//   mask bool, broadcastable to [B, N, T, S], true = attend
//   is_causal top-left causal mask (s <= t + query_offset)
//   window_left, window_right  sliding window (-1 = unbounded side)
//   query_offset  position of query row 0 among the keys (cached decoding)
//   logits_soft_cap  cap of cap * tanh(logits / cap) (0 = off)
//   scale softmax scale (default 1/sqrt(H)); dropout_rate, seed (Philox key)
//   delta rowsum(do * o) [B, N, T], the backward's workspace
//   Params: attention_params.h (POD; the CUDA kernels take the same structs).
//
// Layout (Keras'): q [B, T, N, H], k [B, S, Nkv, H], v [B, S, Nkv, Hv],
// o [B, T, N, Hv], lse [B, N, T]. N % Nkv == 0: query head n reads kv head
// n / (N / Nkv) (multi-head, grouped-query, multi-query). q, k, v, o, do, dq,
// dk, dv may have any element strides (TensorStrides: batch, seq, head) with
// a contiguous last axis, e.g. [B, N, T, H] memory read as [B, T, N, H];
// unset strides mean C-contiguous. lse and delta are always contiguous.
//
//   x[b,n,t,s]      = scale * <q[b,t,n,:], k[b,s,n/g,:]>
//   logits          = x, or cap * tanh(x / cap) with logits_soft_cap = cap > 0
//   pos(t)          = t + query_offset
//   allowed(t, s)   = mask[b,n,t,s] && (!is_causal || s <= pos(t))
//                     && (window_left < 0 || s >= pos(t) - window_left)
//                     && (window_right < 0 || s <= pos(t) + window_right)
//                     (the Band of attention_params.h, then the mask)
//   p               = softmax over allowed s; masked entries get probability 0
//   p_drop          = p * keep(seed,b,n,t,s) / (1 - dropout_rate)
//   o[b,t,n,:]      = sum_s p_drop * v[b,s,n/g,:]
//   lse[b,n,t]      = log(sum_{allowed s} exp(logits))
// A row with no allowed key gives the uniform average over all S keys (what
// Keras' large-negative fill produces); its lse is stored as +inf, which tells
// the backward to use p = 1/S and no gradient to q and k for that row.
//
// Key tiles outside the band are never visited, forward or backward: a
// sliding window costs O(T x window), not O(T x S).
//
// The backward recomputes p from lse (no T x S storage) and writes dq, dk, dv;
// dk/dv of a kv head sum the contributions of every query head of its group.
// No floating-point atomics: results are bitwise identical across runs and
// thread counts.
#pragma once

#include "tf_fastattn/attention_params.h"
#include "tf_fastattn/common.h"

namespace tf_fastattn {

// FlashAttention's FLOP count, used by every benchmark: forward 4 B N T S H
// (halved when causal), forward + backward 3.5x that (the backward 2.5x).
inline double attention_flops(int64_t batch, int64_t heads, int64_t seqlen_q, int64_t seqlen_k, int64_t head_dim,
                              bool is_causal, bool backward) {
  const double fwd = 4.0 * static_cast<double>(batch) * static_cast<double>(heads) * static_cast<double>(seqlen_q) *
                     static_cast<double>(seqlen_k) * static_cast<double>(head_dim) * (is_causal ? 0.5 : 1.0);
  return backward ? 3.5 * fwd : fwd;
}

// Checks sizes, dtypes, options, pointers and that no output's strides make
// elements overlap (csrc/core/validate.cc, for every backend; inputs may have
// any strides). Kernels assume a validated, finalize()d params struct.
Status validate(const AttentionFwdParams& p);
Status validate(const AttentionBwdParams& p);

// Scratch for the backward (row sums of dO * O, per-thread buffers). Depends on
// shapes and the number of threads the CPU context may use.
int64_t attention_bwd_workspace_bytes(const AttentionShape& shape, DType dtype, int num_threads);

// The CPU backend, called by the core (csrc/core/dispatch.cc) with
// finalize()d params: the kernels read the derived fields.
Status attention_fwd_cpu(const AttentionFwdParams& p, const CpuContext& ctx);
Status attention_bwd_cpu(const AttentionBwdParams& p, const CpuContext& ctx);

}  // namespace tf_fastattn
