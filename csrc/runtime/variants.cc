// Variant naming and the per-architecture variant list; see variants.h.
#include "runtime/variants.h"

#include <cstdlib>
#include <cstring>

namespace tf_fastattn {
namespace gpu {

const std::vector<int>& known_archs() {
  static const std::vector<int> archs = {60, 70, 75, 80, 86, 89, 90};
  return archs;
}

const std::vector<int>& attention_head_dim_buckets() {
  // Powers of two: 40 runs in the 64 variant, 80 and 96 in the 128 one.
  static const std::vector<int> buckets = {32, 64, 128, 256};
  return buckets;
}

int attention_head_dim_bucket(int64_t head_dim, int64_t head_dim_v) {
  const int64_t h = head_dim > head_dim_v ? head_dim : head_dim_v;
  for (int b : attention_head_dim_buckets()) {
    if (h <= b) return b;
  }
  return 0;
}

bool tensor_core_supported(int arch, DType dtype) {
  return arch >= 80 && (dtype == DType::kFloat16 || dtype == DType::kBFloat16);
}

Status resolve_attention_family(int arch, DType dtype, AttentionFamily requested, AttentionFamily* out) {
  if (dtype == DType::kFloat64) {
    return Status::Invalid("attention on the GPU supports float16, bfloat16 and float32, got float64");
  }
  if (requested == AttentionFamily::kAuto) {
    const char* env = std::getenv("TF_FASTATTN_ATTENTION_FAMILY");
    if (env && std::strcmp(env, "simt") == 0) requested = AttentionFamily::kSimt;
    if (env && std::strcmp(env, "tensor_core") == 0) requested = AttentionFamily::kTensorCore;
  }
  if (requested == AttentionFamily::kAuto) {
    *out = tensor_core_supported(arch, dtype) ? AttentionFamily::kTensorCore : AttentionFamily::kSimt;
    return Status::OK();
  }
  if (requested == AttentionFamily::kTensorCore && !tensor_core_supported(arch, dtype)) {
    return Status::Invalid(std::string("the tensor-core attention family needs float16 or bfloat16 on sm_80 or "
                                       "newer, got ") + dtype_name(dtype) + " on sm_" + std::to_string(arch));
  }
  *out = requested;
  return Status::OK();
}

KernelVariant layer_norm_variant(DType dtype) {
  return {"layer_norm.cu", {"TFA_DTYPE=" + std::to_string(static_cast<int>(dtype))}};
}

KernelVariant attention_variant(AttentionFamily family, DType dtype, int head_dim_bucket, bool backward) {
  // Tensor-core backward: its own file (attention_mma_bwd.cu), same defines.
  const char* file = family != AttentionFamily::kTensorCore ? "attention_simt.cu"
                     : backward                             ? "attention_mma_bwd.cu"
                                                            : "attention_mma.cu";
  return {file,
          {"TFA_DTYPE=" + std::to_string(static_cast<int>(dtype)), "TFA_HEAD_DIM=" + std::to_string(head_dim_bucket),
           std::string("TFA_BACKWARD=") + (backward ? "1" : "0")}};
}

std::vector<VariantInfo> all_variants(int arch) {
  std::vector<VariantInfo> out;
  for (DType t : {DType::kFloat16, DType::kBFloat16, DType::kFloat32, DType::kFloat64}) {
    out.push_back({layer_norm_variant(t), "layer_norm", "rows", dtype_name(t), "fwd+bwd", 0});
  }
  for (AttentionFamily f : {AttentionFamily::kSimt, AttentionFamily::kTensorCore}) {
    for (DType t : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
      if (f == AttentionFamily::kTensorCore && !tensor_core_supported(arch, t)) continue;
      for (int hd : attention_head_dim_buckets()) {
        for (bool bwd : {false, true}) {
          out.push_back({attention_variant(f, t, hd, bwd), "attention",
                         f == AttentionFamily::kTensorCore ? "tensor_core" : "simt", dtype_name(t),
                         bwd ? "bwd" : "fwd", hd});
        }
      }
    }
  }
  return out;
}

}  // namespace gpu
}  // namespace tf_fastattn
