// The kernel variants the GPU dispatchers choose from, per architecture: the
// single list that launchers, `python -m tf_fastattn precompile` and the CI
// compile test share.
#pragma once

#include <string>
#include <vector>

#include "runtime/compiler.h"
#include "tf_fastattn/common.h"
#include "tf_fastattn/gpu.h"

namespace tf_fastattn {
namespace gpu {

struct VariantInfo {
  KernelVariant variant;
  std::string op;         // "layer_norm" or "attention"
  std::string family;     // "rows" (layer norm), "simt" or "tensor_core"
  std::string dtype;      // "float16", ...
  std::string direction;  // "fwd+bwd" (layer norm), "fwd" or "bwd"
  int head_dim = 0;       // attention head-dim bucket (0 for layer norm)
};

// The architectures the kernels are written and tested for (compute
// capability x 10); precompile accepts these.
const std::vector<int>& known_archs();

// Head-dim buckets: a variant for bucket D serves max(H, Hv) <= D.
const std::vector<int>& attention_head_dim_buckets();
int attention_head_dim_bucket(int64_t head_dim, int64_t head_dim_v);

// Whether the tensor-core family can run `dtype` on sm_<arch>.
bool tensor_core_supported(int arch, DType dtype);

// The family the attention dispatcher picks (kAuto resolved, env override).
Status resolve_attention_family(int arch, DType dtype, AttentionFamily requested, AttentionFamily* out);

KernelVariant layer_norm_variant(DType dtype);
KernelVariant attention_variant(AttentionFamily family, DType dtype, int head_dim_bucket, bool backward);

// Every variant the dispatchers can choose on sm_<arch>.
std::vector<VariantInfo> all_variants(int arch);

}  // namespace gpu
}  // namespace tf_fastattn
