// Fused scaled-dot-product attention (FlashAttention-style, exact).
//
// Layout (Keras'): q [B, T, N, H], k [B, S, Nkv, H], v [B, S, Nkv, Hv],
// o [B, T, N, Hv], lse [B, N, T]. N % Nkv == 0: query head n reads kv head
// n / (N / Nkv) (multi-head, grouped-query, multi-query).
//
//   logits[b,n,t,s] = scale * <q[b,t,n,:], k[b,s,n/g,:]>
//   allowed(t, s)   = mask[b,n,t,s] && (!is_causal || s <= t)   (top-left causal)
//   p               = softmax over allowed s; masked entries get probability 0
//   p_drop          = p * keep(seed,b,n,t,s) / (1 - dropout_rate)
//   o[b,t,n,:]      = sum_s p_drop * v[b,s,n/g,:]
//   lse[b,n,t]      = log(sum_{allowed s} exp(logits))
// A row with no allowed key gives the uniform average over all S keys (what
// Keras' large-negative fill produces); its lse is stored as +inf, which tells
// the backward to use p = 1/S and no gradient to q and k for that row.
//
// The backward recomputes p from lse (no T x S storage) and writes dq, dk, dv;
// dk/dv of a kv head sum the contributions of every query head of its group.
// No floating-point atomics: results are bitwise identical across runs and
// thread counts.
#pragma once

#include "tf_fastattn/common.h"

namespace tf_fastattn {

constexpr int64_t kMaxHeadDim = 256;

// FlashAttention's FLOP count, used by every benchmark: forward 4 B N T S H
// (halved when causal), forward + backward 3.5x that (the backward 2.5x).
inline double attention_flops(int64_t batch, int64_t heads, int64_t seqlen_q, int64_t seqlen_k, int64_t head_dim,
                              bool is_causal, bool backward) {
  const double fwd = 4.0 * static_cast<double>(batch) * static_cast<double>(heads) * static_cast<double>(seqlen_q) *
                     static_cast<double>(seqlen_k) * static_cast<double>(head_dim) * (is_causal ? 0.5 : 1.0);
  return backward ? 3.5 * fwd : fwd;
}

struct AttentionShape {
  int64_t batch = 0;         // B
  int64_t seqlen_q = 0;      // T
  int64_t seqlen_k = 0;      // S
  int64_t num_heads = 0;     // N
  int64_t num_heads_kv = 0;  // Nkv
  int64_t head_dim = 0;      // H (q, k)
  int64_t head_dim_v = 0;    // Hv (v, o)
};

// Strides in elements of a boolean mask broadcast to [B, N, T, S]; a stride of
// 0 broadcasts that axis.
struct MaskStrides {
  int64_t batch = 0, head = 0, row = 0, col = 0;
};

struct AttentionFwdParams {
  DType dtype = DType::kFloat32;  // q, k, v, o
  AttentionShape shape;
  const void* q = nullptr;  // [B, T, N, H] contiguous
  const void* k = nullptr;  // [B, S, Nkv, H] contiguous
  const void* v = nullptr;  // [B, S, Nkv, Hv] contiguous
  const bool* mask = nullptr;  // optional, see mask_strides (true = attend)
  MaskStrides mask_strides;
  void* o = nullptr;    // [B, T, N, Hv] out
  void* lse = nullptr;  // [B, N, T] stats_dtype(dtype) out
  double scale = 0.0;   // softmax scale (the front end fills 1/sqrt(H) by default)
  bool is_causal = false;
  double dropout_rate = 0.0;  // in [0, 1)
  uint64_t seed = 0;          // Philox key when dropout_rate > 0
};

struct AttentionBwdParams {
  DType dtype = DType::kFloat32;
  AttentionShape shape;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const bool* mask = nullptr;
  MaskStrides mask_strides;
  const void* o = nullptr;    // forward output [B, T, N, Hv]
  const void* lse = nullptr;  // forward lse [B, N, T]
  const void* do_ = nullptr;  // [B, T, N, Hv] in
  void* dq = nullptr;         // [B, T, N, H] out
  void* dk = nullptr;         // [B, S, Nkv, H] out
  void* dv = nullptr;         // [B, S, Nkv, Hv] out
  void* workspace = nullptr;  // attention_bwd_workspace_bytes(...) bytes
  double scale = 0.0;
  bool is_causal = false;
  double dropout_rate = 0.0;
  uint64_t seed = 0;
};

Status validate(const AttentionFwdParams& p);
Status validate(const AttentionBwdParams& p);

// Scratch for the backward (row sums of dO * O, per-thread buffers). Depends on
// shapes and the number of threads the CPU context may use.
int64_t attention_bwd_workspace_bytes(const AttentionShape& shape, DType dtype, int num_threads);

Status attention_fwd_cpu(const AttentionFwdParams& p, const CpuContext& ctx);
Status attention_bwd_cpu(const AttentionBwdParams& p, const CpuContext& ctx);

}  // namespace tf_fastattn
