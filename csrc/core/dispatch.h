// One entry point per op and direction: a front end fills the params struct
// and an execution context, and the core validates, picks the CPU or GPU
// backend and runs it. Workspace sizes are asked of the same layer.
#pragma once

#include <cstdint>

#include "tf_fastattn/attention.h"
#include "tf_fastattn/common.h"
#include "tf_fastattn/gpu.h"
#include "tf_fastattn/layer_norm.h"

namespace tf_fastattn {
namespace core {

enum class Backend { kCpu, kGpu };

// Where and how an op runs: the CPU's work-sharing, or the GPU's stream.
struct ExecContext {
  Backend backend = Backend::kCpu;
  CpuContext cpu = serial_cpu_context();
  GpuContext gpu;
};

Status attention_fwd(const AttentionFwdParams& p, const ExecContext& ctx);
Status attention_bwd(const AttentionBwdParams& p, const ExecContext& ctx);
int64_t attention_bwd_workspace_bytes(const AttentionShape& shape, DType dtype, const ExecContext& ctx);

Status layer_norm_fwd(const LayerNormFwdParams& p, const ExecContext& ctx);
Status layer_norm_bwd(const LayerNormBwdParams& p, const ExecContext& ctx);
int64_t layer_norm_bwd_workspace_bytes(int64_t rows, int64_t cols, DType dtype, const ExecContext& ctx);

}  // namespace core
}  // namespace tf_fastattn
