// The attention's params structs, one per direction (names: the glossary
// of attention.h). POD only, no standard headers beyond <cstdint>: the host
// code (g++) and the CUDA kernels (NVRTC) include this same file, and the
// kernels take these structs as their argument, so host and device agree on
// every field by construction.
#pragma once

#include <cstdint>

#include "tf_fastattn/dtype.h"
#include "tf_fastattn/philox.h"

namespace tf_fastattn {

constexpr int64_t kMaxHeadDim = 256;

struct AttentionShape {
  int64_t batch = 0;         // B
  int64_t seqlen_q = 0;      // T
  int64_t seqlen_k = 0;      // S
  int64_t num_heads = 0;     // N
  int64_t num_heads_kv = 0;  // Nkv
  int64_t head_dim = 0;      // H (q, k)
  int64_t head_dim_v = 0;    // Hv (v, o)
};

// Element strides of a [batch, seq, heads, dim] tensor whose last axis is
// contiguous (q, k, v, o, do, dq, dk, dv). All zero, the default, means
// C-contiguous: finalize() fills them.
struct TensorStrides {
  int64_t batch = 0, seq = 0, head = 0;

  // Element offset of (b, t, n): the start of that row of dim values.
  int64_t offset(int64_t b, int64_t t, int64_t n) const { return b * batch + t * seq + n * head; }

  // The strides of a C-contiguous [*, seq, heads, dim] tensor where these are unset.
  void default_to_contiguous(int64_t seq_len, int64_t heads, int64_t dim) {
    if (batch == 0 && seq == 0 && head == 0) {
      head = dim;
      seq = heads * dim;
      batch = seq_len * heads * dim;
    }
  }
};

// A side of the key band without a bound: far outside any position, and
// small enough that position arithmetic on it cannot overflow.
constexpr int64_t kUnbounded = int64_t(1) << 60;

// The keys query row t may attend, before the mask: t + lo <= s <= t + hi
// (a diagonal band; lo = -kUnbounded or hi = kUnbounded: no bound on that
// side). Always lo <= hi.
struct Band {
  int64_t lo = -kUnbounded, hi = kUnbounded;
};

// The band of a causal flag, a sliding window (left, right; -1 = unbounded)
// and the query offset: query row t sits at position t + query_offset, sees
// keys s <= t + query_offset when causal (top-left aligned for offset 0), and
// t + query_offset - left <= s <= t + query_offset + right.
inline Band attention_band(bool is_causal, int64_t window_left, int64_t window_right, int64_t query_offset) {
  Band b;
  if (window_left >= 0) b.lo = query_offset - window_left;
  if (window_right >= 0) b.hi = query_offset + window_right;
  if (is_causal && query_offset < b.hi) b.hi = query_offset;
  return b;
}

// Strides in elements of a boolean mask broadcast to [B, N, T, S]; a stride of
// 0 broadcasts that axis.
struct MaskStrides {
  int64_t batch = 0, head = 0, row = 0, col = 0;
};

// What both directions share: the problem, the inputs, the options, and the
// fields finalize() derives from them.
struct AttentionParams {
  DType dtype = DType::kFloat32;  // q, k, v, o (and do, dq, dk, dv)
  AttentionShape shape;
  const void* q = nullptr;     // [B, T, N, H]
  const void* k = nullptr;     // [B, S, Nkv, H]
  const void* v = nullptr;     // [B, S, Nkv, Hv]
  TensorStrides q_strides, k_strides, v_strides;
  const bool* mask = nullptr;  // optional, see mask_strides (true = attend)
  MaskStrides mask_strides;
  double scale = 0.0;  // softmax scale (the front end fills 1/sqrt(H) by default)
  bool is_causal = false;
  // Sliding window: query t attends keys t + query_offset - window_left ..
  // t + query_offset + window_right; -1 = unbounded on that side.
  int64_t window_left = -1, window_right = -1;
  // Query row t is at position t + query_offset (causal and window; cached
  // decoding); 0: top-left aligned.
  int64_t query_offset = 0;
  // GPU only: the device address of query_offset (an int32), read by the
  // kernels instead of `query_offset` when set (XLA's custom calls).
  const int32_t* query_offset_device = nullptr;
  // > 0: logits = cap * tanh(logits / cap) before masking and softmax
  // (Gemma 2's soft-capping); 0: off.
  double logits_soft_cap = 0.0;
  double dropout_rate = 0.0;  // in [0, 1)
  uint64_t seed = 0;          // Philox key when dropout_rate > 0
  // GPU only: the device address of the Philox key, read by the kernels
  // instead of `seed` when set (front ends whose seed is a device value: XLA's
  // custom calls; no host round trip).
  const uint64_t* seed_device = nullptr;

  // Derived by finalize() from the fields above (the kernels read these).
  double inv_keep_f64 = 1;         // 1 / (1 - dropout_rate) in float64 (the CPU's float64 path)
  float scale_f32 = 0;             // scale rounded to float32
  float scale_log2 = 0;            // scale * log2(e) in float32: the GPU kernels use exp2
  float inv_keep = 1;              // 1 / (1 - dropout_rate) in float32
  uint32_t dropout_threshold = 0;  // a key is kept when its Philox word is >= this (philox.h)
  int32_t has_dropout = 0;         // dropout_rate > 0
  float soft_cap_f32 = 0;          // logits_soft_cap rounded to float32 (0: off)
  int32_t has_soft_cap = 0;        // logits_soft_cap > 0
  Band band;                       // attention_band(...) of the host's query_offset

  // Fills the derived fields; the core (csrc/core/dispatch.cc) calls it
  // before any backend runs (the directions' finalize() call this one).
  void finalize() {
    const AttentionShape& s = shape;
    q_strides.default_to_contiguous(s.seqlen_q, s.num_heads, s.head_dim);
    k_strides.default_to_contiguous(s.seqlen_k, s.num_heads_kv, s.head_dim);
    v_strides.default_to_contiguous(s.seqlen_k, s.num_heads_kv, s.head_dim_v);
    scale_f32 = static_cast<float>(scale);
    scale_log2 = static_cast<float>(scale * 1.4426950408889634);
    has_dropout = dropout_rate > 0;
    inv_keep_f64 = 1.0 / (1.0 - dropout_rate);
    inv_keep = static_cast<float>(inv_keep_f64);
    dropout_threshold = tf_fastattn::dropout_threshold(dropout_rate);
    has_soft_cap = logits_soft_cap > 0;
    soft_cap_f32 = static_cast<float>(logits_soft_cap);
    band = attention_band(is_causal, window_left, window_right, query_offset);
  }
};

struct AttentionFwdParams : AttentionParams {
  void* o = nullptr;    // [B, T, N, Hv] out
  void* lse = nullptr;  // [B, N, T] stats_dtype(dtype) out, contiguous
  TensorStrides o_strides;

  void finalize() {
    AttentionParams::finalize();
    o_strides.default_to_contiguous(shape.seqlen_q, shape.num_heads, shape.head_dim_v);
  }
};

struct AttentionBwdParams : AttentionParams {
  const void* o = nullptr;    // the forward's out [B, T, N, Hv]
  const void* lse = nullptr;  // the forward's lse [B, N, T], contiguous
  const void* do_ = nullptr;  // [B, T, N, Hv] in
  void* dq = nullptr;         // [B, T, N, H] out
  void* dk = nullptr;         // [B, S, Nkv, H] out
  void* dv = nullptr;         // [B, S, Nkv, Hv] out
  void* workspace = nullptr;  // attention_bwd_workspace_bytes(...) bytes: delta (double on
                              // the CPU, float on the GPU) [B, N, T]
  TensorStrides o_strides, do_strides, dq_strides, dk_strides, dv_strides;

  void finalize() {
    AttentionParams::finalize();
    const AttentionShape& s = shape;
    o_strides.default_to_contiguous(s.seqlen_q, s.num_heads, s.head_dim_v);
    do_strides.default_to_contiguous(s.seqlen_q, s.num_heads, s.head_dim_v);
    dq_strides.default_to_contiguous(s.seqlen_q, s.num_heads, s.head_dim);
    dk_strides.default_to_contiguous(s.seqlen_k, s.num_heads_kv, s.head_dim);
    dv_strides.default_to_contiguous(s.seqlen_k, s.num_heads_kv, s.head_dim_v);
  }
};

// The layout both compilers must produce (x86-64 g++ and NVRTC's nvptx64 use
// the same sizes and alignments for these types): a field added or reordered
// changes these sizes, and both builds check them.
static_assert(sizeof(AttentionShape) == 56, "AttentionShape layout");
static_assert(sizeof(AttentionParams) == 336, "AttentionParams layout");
static_assert(sizeof(AttentionFwdParams) == 376, "AttentionFwdParams layout");
static_assert(sizeof(AttentionBwdParams) == 512, "AttentionBwdParams layout");

}  // namespace tf_fastattn
