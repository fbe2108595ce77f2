// Element types of the tensors the kernels read and write. POD only, no
// standard headers beyond <cstdint>: compiled by g++ and by NVRTC alike.
#pragma once

#include <cstdint>

namespace tf_fastattn {

// Element type of a tensor that a kernel reads or writes.
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
  }
  return "unknown";
}

inline int64_t dtype_size(DType t) {
  switch (t) {
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kFloat32: return 4;
    case DType::kFloat64: return 8;
  }
  return 0;
}

// Statistics (layer-norm mean/rstd, attention log-sum-exp) are float32 for
// every input dtype except float64, where they are float64.
inline DType stats_dtype(DType t) { return t == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32; }

}  // namespace tf_fastattn
