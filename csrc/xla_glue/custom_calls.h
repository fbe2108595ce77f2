// The XLA custom calls of the four ops: their target names, operand and
// result order and attributes, shared by the XLA kernels that emit them
// (xla_kernels.cc) and the typed-FFI handlers that run them (ffi_handlers.cc).
//
//   tf_fastattn_attention_fwd   q, k, v, [mask], [seed], [offset] -> o, lse
//   tf_fastattn_attention_bwd   q, k, v, [mask], [seed], [offset], o, lse, do
//                                                                  -> dq, dk, dv, workspace
//   tf_fastattn_layer_norm_fwd  x, [residual], gamma, beta         -> y, [sum], mean, rstd
//   tf_fastattn_layer_norm_bwd  dy, sum, mean, rstd, gamma, [dsum] -> dx, dgamma, dbeta, workspace
//
// Attributes (the backend config, an MLIR dictionary): attention: is_causal,
// has_mask, has_seed, has_offset (bool), window_left, window_right (i64),
// scale, dropout_rate, logits_soft_cap (f64, the exact values);
// layer norm: epsilon (f64, forward only), has_residual / has_dsum, center,
// scale (bool), norm_kind (i64, NormKind). Operands and results are dense
// row-major; the workspace is a
// u8 buffer of the core's workspace size (XLA's allocator provides it).
#pragma once

#include <string>

struct XLA_FFI_Api;

namespace tf_fastattn {
namespace xla_glue {

inline constexpr const char* kAttentionFwd = "tf_fastattn_attention_fwd";
inline constexpr const char* kAttentionBwd = "tf_fastattn_attention_bwd";
inline constexpr const char* kLayerNormFwd = "tf_fastattn_layer_norm_fwd";
inline constexpr const char* kLayerNormBwd = "tf_fastattn_layer_norm_bwd";

// Registers the handlers of `platform` with XLA's FFI registry: "Host" (the
// CPU handlers) or "CUDA" (the GPU handlers). Returns "" or what failed.
std::string register_ffi_handlers(const XLA_FFI_Api* api, const std::string& platform);

}  // namespace xla_glue
}  // namespace tf_fastattn
