// The one validation of the params structs, for every backend and front end:
// sizes, dtypes, options, pointers and strides. The core calls it on
// finalize()d params before a backend runs; the backends' public entry points
// call it too (they may be called directly), so a kernel never sees params
// that failed it.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>

#include "tf_fastattn/attention.h"
#include "tf_fastattn/layer_norm.h"

namespace tf_fastattn {

namespace {

std::string range_message(const char* what, int64_t lo, int64_t hi, int64_t got) {
  return std::string(what) + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " +
         std::to_string(got);
}

// The window, the query offset and the soft cap.
Status validate_band(const AttentionParams& p) {
  const struct {
    const char* name;
    int64_t value;
  } sides[] = {{"window_left", p.window_left}, {"window_right", p.window_right}};
  for (const auto& side : sides) {
    if (side.value < -1) {
      return Status::Invalid(std::string(side.name) + " must be >= 0, or -1 for no bound, got " +
                             std::to_string(side.value));
    }
  }
  // The offset places the T query rows at positions offset .. offset + T - 1
  // among the S keys; a device-side offset (GPU) is read by the kernels.
  const int64_t T = p.shape.seqlen_q, S = p.shape.seqlen_k;
  if (p.query_offset_device == nullptr && p.query_offset != 0 && (p.query_offset < 0 || p.query_offset + T > S)) {
    return Status::Invalid("query_offset must be in [0, S - T] = [0, " + std::to_string(S - T) +
                           "] (query rows at positions query_offset .. query_offset + T - 1 of the S = " +
                           std::to_string(S) + " keys), got " + std::to_string(p.query_offset) + " with T = " +
                           std::to_string(T));
  }
  if (!(p.logits_soft_cap >= 0.0) || !std::isfinite(p.logits_soft_cap)) {
    return Status::Invalid("logits_soft_cap must be a finite number >= 0 (0 = off), got " +
                           std::to_string(p.logits_soft_cap));
  }
  return Status::OK();
}

Status validate_common(DType dtype, const AttentionShape& s, double scale, double dropout_rate) {
  switch (dtype) {
    case DType::kFloat16:
    case DType::kBFloat16:
    case DType::kFloat32:
    case DType::kFloat64: break;
    default: return Status::Invalid("attention: unsupported dtype " + std::to_string(static_cast<int>(dtype)));
  }
  const struct {
    const char* name;
    int64_t value;
  } sizes[] = {{"batch (B)", s.batch},
               {"seqlen_q (T)", s.seqlen_q},
               {"seqlen_k (S)", s.seqlen_k},
               {"num_heads (N)", s.num_heads},
               {"num_heads_kv (Nkv)", s.num_heads_kv}};
  for (const auto& sz : sizes) {
    if (sz.value < 0) return Status::Invalid(std::string(sz.name) + " must be >= 0, got " + std::to_string(sz.value));
  }
  if (s.num_heads > 0) {
    if (s.num_heads_kv <= 0)
      return Status::Invalid("num_heads_kv (Nkv) must be >= 1 when num_heads (N) > 0, got " +
                             std::to_string(s.num_heads_kv));
    if (s.num_heads % s.num_heads_kv != 0)
      return Status::Invalid("num_heads (N) must be a multiple of num_heads_kv (Nkv), got N = " +
                             std::to_string(s.num_heads) + ", Nkv = " + std::to_string(s.num_heads_kv));
  }
  if (s.head_dim < 1 || s.head_dim > kMaxHeadDim) return Status::Invalid(range_message("head_dim (H)", 1, kMaxHeadDim, s.head_dim));
  if (s.head_dim_v < 1 || s.head_dim_v > kMaxHeadDim)
    return Status::Invalid(range_message("head_dim_v (Hv)", 1, kMaxHeadDim, s.head_dim_v));
  if (!std::isfinite(scale)) return Status::Invalid("scale must be finite, got " + std::to_string(scale));
  if (!(dropout_rate >= 0.0 && dropout_rate < 1.0))
    return Status::Invalid("dropout_rate must be in [0, 1), got " + std::to_string(dropout_rate));
  return Status::OK();
}

Status require(const void* ptr, int64_t elements, const char* name) {
  if (elements > 0 && ptr == nullptr)
    return Status::Invalid(std::string(name) + " must not be null (it has " + std::to_string(elements) + " elements)");
  return Status::OK();
}

struct Sizes {
  int64_t q, kv_k, kv_v, o, lse;
};

Sizes element_counts(const AttentionShape& s) {
  Sizes z;
  z.q = s.batch * s.seqlen_q * s.num_heads * s.head_dim;
  z.kv_k = s.batch * s.seqlen_k * s.num_heads_kv * s.head_dim;
  z.kv_v = s.batch * s.seqlen_k * s.num_heads_kv * s.head_dim_v;
  z.o = s.batch * s.seqlen_q * s.num_heads * s.head_dim_v;
  z.lse = s.batch * s.num_heads * s.seqlen_q;
  return z;
}

std::string strides_string(const TensorStrides& st) {
  return "(batch " + std::to_string(st.batch) + ", seq " + std::to_string(st.seq) + ", head " +
         std::to_string(st.head) + ")";
}

// An output's strides ([batch, seq, heads, dim], dim contiguous) must not put
// two elements at one address: checked as the axes of size > 1 nesting, each
// stride (in magnitude) at least the span of the axes inside it (any
// permutation of a dense layout, slices of one, gaps and reversed axes pass).
// Inputs may have any strides, 0 (broadcast) and negative included.
Status check_output_strides(const TensorStrides& st, int64_t batch, int64_t seq, int64_t heads, int64_t dim,
                            const char* name) {
  if (batch == 0 || seq == 0 || heads == 0) return Status::OK();  // (an empty tensor has no overlap)
  struct Axis {
    int64_t stride, size;
  } axes[3] = {{std::abs(st.batch), batch}, {std::abs(st.seq), seq}, {std::abs(st.head), heads}};
  std::sort(axes, axes + 3, [](const Axis& a, const Axis& b) { return a.stride < b.stride; });
  int64_t span = dim;  // elements one step of the innermost axis must clear
  for (const Axis& a : axes) {
    if (a.size <= 1) continue;
    if (a.stride < span) {
      return Status::Invalid(std::string("output ") + name + "_strides " + strides_string(st) +
                             " make elements of " + name + " [" + std::to_string(batch) + ", " + std::to_string(seq) +
                             ", " + std::to_string(heads) + ", " + std::to_string(dim) +
                             "] overlap (unset strides mean C-contiguous)");
    }
    span = a.stride * a.size;
  }
  return Status::OK();
}

Status check_layer_norm_sizes(int64_t rows, int64_t cols, DType dtype, DType param_dtype) {
  if (rows < 0) return Status::Invalid("rows must be >= 0, got " + std::to_string(rows));
  if (cols < 1) return Status::Invalid("the normalized axis must have size >= 1, got " + std::to_string(cols));
  if (param_dtype != DType::kFloat32 && param_dtype != dtype) {
    return Status::Invalid(std::string("gamma/beta dtype must be float32 or the input dtype (") +
                           dtype_name(dtype) + "), got " + dtype_name(param_dtype));
  }
  return Status::OK();
}

Status need(const void* ptr, const char* name) {
  return ptr ? Status::OK() : Status::Invalid(std::string(name) + " must not be null");
}

// An output's row stride: rows must not overlap (inputs may have any stride).
Status check_output_row_stride(int64_t stride, int64_t rows, int64_t cols, const char* name) {
  if (rows <= 1 || std::abs(stride) >= cols) return Status::OK();
  return Status::Invalid(std::string("output ") + name + "_row_stride must be at least the row length " +
                         std::to_string(cols) + " in magnitude (rows must not overlap), got " + std::to_string(stride));
}

// What both directions check: sizes, options, and q, k, v, o, lse (the
// forward's outputs, the backward's inputs) present.
Status validate_shared(const AttentionParams& p, const void* o, const void* lse, Sizes* z) {
  TFA_RETURN_IF_ERROR(validate_common(p.dtype, p.shape, p.scale, p.dropout_rate));
  TFA_RETURN_IF_ERROR(validate_band(p));
  *z = element_counts(p.shape);
  TFA_RETURN_IF_ERROR(require(p.q, z->q, "q"));
  TFA_RETURN_IF_ERROR(require(p.k, z->kv_k, "k"));
  TFA_RETURN_IF_ERROR(require(p.v, z->kv_v, "v"));
  TFA_RETURN_IF_ERROR(require(o, z->o, "o"));
  return require(lse, z->lse, "lse");
}

}  // namespace

Status validate(const AttentionFwdParams& p) {
  Sizes z;
  TFA_RETURN_IF_ERROR(validate_shared(p, p.o, p.lse, &z));
  const AttentionShape& s = p.shape;
  return check_output_strides(p.o_strides, s.batch, s.seqlen_q, s.num_heads, s.head_dim_v, "o");
}

Status validate(const AttentionBwdParams& p) {
  Sizes z;
  TFA_RETURN_IF_ERROR(validate_shared(p, p.o, p.lse, &z));
  const AttentionShape& s = p.shape;
  TFA_RETURN_IF_ERROR(require(p.do_, z.o, "do"));
  TFA_RETURN_IF_ERROR(require(p.dq, z.q, "dq"));
  TFA_RETURN_IF_ERROR(require(p.dk, z.kv_k, "dk"));
  TFA_RETURN_IF_ERROR(require(p.dv, z.kv_v, "dv"));
  TFA_RETURN_IF_ERROR(require(p.workspace, z.lse, "workspace"));
  TFA_RETURN_IF_ERROR(check_output_strides(p.dq_strides, s.batch, s.seqlen_q, s.num_heads, s.head_dim, "dq"));
  TFA_RETURN_IF_ERROR(check_output_strides(p.dk_strides, s.batch, s.seqlen_k, s.num_heads_kv, s.head_dim, "dk"));
  return check_output_strides(p.dv_strides, s.batch, s.seqlen_k, s.num_heads_kv, s.head_dim_v, "dv");
}

Status check_norm_kind(int32_t kind, bool has_beta) {
  if (kind != kLayerNorm && kind != kRmsNorm && kind != kRmsScaling) {
    return Status::Invalid("norm_kind must be 0 (layer norm), 1 (RMS norm) or 2 (rms_scaling), got " +
                           std::to_string(kind));
  }
  if (kind != kLayerNorm && has_beta) {
    return Status::Invalid("the RMS norms take no beta (center must be false)");
  }
  return Status::OK();
}

Status validate(const LayerNormFwdParams& p) {
  TFA_RETURN_IF_ERROR(check_layer_norm_sizes(p.rows, p.cols, p.dtype, p.param_dtype));
  TFA_RETURN_IF_ERROR(check_norm_kind(p.norm_kind, p.beta != nullptr));
  if (!(p.epsilon > 0) || !std::isfinite(p.epsilon)) {
    return Status::Invalid("epsilon must be a finite number > 0, got " + std::to_string(p.epsilon));
  }
  if (p.rows == 0) return Status::OK();
  TFA_RETURN_IF_ERROR(need(p.x, "x"));
  TFA_RETURN_IF_ERROR(need(p.y, "y"));
  TFA_RETURN_IF_ERROR(need(p.mean, "mean"));
  TFA_RETURN_IF_ERROR(need(p.rstd, "rstd"));
  TFA_RETURN_IF_ERROR(check_output_row_stride(p.y_row_stride, p.rows, p.cols, "y"));
  return p.sum ? check_output_row_stride(p.sum_row_stride, p.rows, p.cols, "sum") : Status::OK();
}

Status validate(const LayerNormBwdParams& p) {
  TFA_RETURN_IF_ERROR(check_layer_norm_sizes(p.rows, p.cols, p.dtype, p.param_dtype));
  TFA_RETURN_IF_ERROR(check_norm_kind(p.norm_kind, p.dbeta != nullptr));
  if (p.rows == 0) return Status::OK();
  TFA_RETURN_IF_ERROR(need(p.dy, "dy"));
  TFA_RETURN_IF_ERROR(need(p.sum, "sum"));
  TFA_RETURN_IF_ERROR(need(p.mean, "mean"));
  TFA_RETURN_IF_ERROR(need(p.rstd, "rstd"));
  TFA_RETURN_IF_ERROR(need(p.dx, "dx"));
  TFA_RETURN_IF_ERROR(need(p.workspace, "workspace"));
  return check_output_row_stride(p.dx_row_stride, p.rows, p.cols, "dx");
}

}  // namespace tf_fastattn
