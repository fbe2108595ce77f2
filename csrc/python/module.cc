// tf_fastattn._C: the kernel core on NumPy arrays, without TensorFlow.
#include <algorithm>
#include <map>
#include <string>
#include <sstream>
#include <thread>

#include "kernels/cpu/attention_microkernels.h"
#include "python/common.h"

namespace tf_fastattn {
namespace python {

DType dtype_of(const py::array& a, const char* name) {
  const py::dtype dt = a.dtype();
  const std::string n = py::str(dt.attr("name"));
  if (n == "float16") return DType::kFloat16;
  if (n == "bfloat16") return DType::kBFloat16;
  if (n == "float32") return DType::kFloat32;
  if (n == "float64") return DType::kFloat64;
  throw py::value_error(std::string(name) + " must be float16, bfloat16, float32 or float64, got " + n);
}

py::array empty_like_dtype(const py::array& like, const std::vector<py::ssize_t>& shape) {
  return py::array(like.dtype(), shape);
}

py::array empty_of(DType t, const std::vector<py::ssize_t>& shape) {
  switch (t) {
    case DType::kFloat16: return py::array(py::dtype("float16"), shape);
    case DType::kFloat32: return py::array(py::dtype("float32"), shape);
    case DType::kFloat64: return py::array(py::dtype("float64"), shape);
    case DType::kBFloat16: {
      py::object bf16 = py::module_::import("ml_dtypes").attr("bfloat16");
      return py::array(py::dtype::from_args(bf16), shape);
    }
  }
  throw py::value_error("unknown dtype");
}

void require_contiguous(const py::array& a, const char* name) {
  if (!(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) + " must be C-contiguous");
  }
}

std::string shape_str(const py::array& a) {
  std::ostringstream os;
  os << "[";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) os << (i ? ", " : "") << a.shape(i);
  os << "]";
  return os.str();
}

CpuContext thread_context(int num_threads) {
  if (num_threads <= 0) num_threads = std::max(1u, std::thread::hardware_concurrency());
  CpuContext ctx;
  ctx.num_threads = num_threads;
  ctx.parallel_for = [num_threads](int64_t total, int64_t, const std::function<void(int64_t, int64_t)>& fn) {
    if (total <= 0) return;
    const int64_t workers = std::min<int64_t>(num_threads, total);
    if (workers == 1) {
      fn(0, total);
      return;
    }
    std::vector<std::thread> threads;
    threads.reserve(workers - 1);
    for (int64_t w = 1; w < workers; ++w) {
      threads.emplace_back([=, &fn] { fn(total * w / workers, total * (w + 1) / workers); });
    }
    fn(0, total / workers);
    for (auto& t : threads) t.join();
  };
  return ctx;
}

void check(const Status& s) {
  if (!s.ok()) throw py::value_error(s.message());
}

}  // namespace python
}  // namespace tf_fastattn

PYBIND11_MODULE(_C, m) {
  m.doc() = "tf_fastattn kernel core on NumPy arrays (no TensorFlow)";
  m.def("cpu_features", [] {
    std::vector<std::string> f;
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2")) f.push_back("avx2");
    if (__builtin_cpu_supports("fma")) f.push_back("fma");
    if (__builtin_cpu_supports("avx512f")) f.push_back("avx512f");
    if (__builtin_cpu_supports("avx512bf16")) f.push_back("avx512bf16");
    // The attention's bfloat16 products on AMX tiles (granted by the OS,
    // not turned off by TF_FASTATTN_CPU_AMX=0).
    if (tf_fastattn::cpu::amx_enabled()) f.push_back("amx-bf16");
#endif
    return f;
  }, "CPU features the kernels can dispatch on, as detected on this machine.");
  m.def("cpu_attention_paths", [] {
    namespace cpu = tf_fastattn::cpu;
    const std::string tier = cpu::cpu_tier_name(cpu::cpu_tier());
    std::map<std::string, std::string> paths;
    paths["float32"] = tier;
    paths["dropout"] = tier;
    paths["bfloat16"] = cpu::amx_enabled()                  ? "amx-bf16"
                        : cpu::bf16_kernels() != nullptr    ? "avx512-bf16"
                                                            : "float32 products (" + tier + ")";
    return paths;
  }, "The CPU attention's micro-kernel tier per case (float32 products, bfloat16 products, dropout): "
     "the best this CPU has, capped by TF_FASTATTN_CPU_ISA=avx512|avx2|portable.");
  tf_fastattn::python::register_layer_norm(m);
  tf_fastattn::python::register_attention(m);
  tf_fastattn::python::register_gpu(m);
}
