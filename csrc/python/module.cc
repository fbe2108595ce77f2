// tf_fastattn._C: the kernel core on NumPy arrays, without TensorFlow.
#include <algorithm>
#include <atomic>
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

py::dtype dtype_object(DType t) {
  switch (t) {
    case DType::kFloat16: return py::dtype("float16");
    case DType::kFloat32: return py::dtype("float32");
    case DType::kFloat64: return py::dtype("float64");
    case DType::kBFloat16: return py::dtype::from_args(py::module_::import("ml_dtypes").attr("bfloat16"));
  }
  throw py::value_error("unknown dtype");
}

py::array empty_of(DType t, const std::vector<py::ssize_t>& shape) { return py::array(dtype_object(t), shape); }

core::Dims dims_of(const py::array& a) {
  return core::Dims::from(static_cast<int>(a.ndim()), [&](int i) { return a.shape(i); });
}

Outputs::Outputs(const std::optional<py::tuple>& given, const char* function, std::vector<const char*> names)
    : given_(given), function_(function), names_(std::move(names)) {
  if (given_ && given_->size() != names_.size()) {
    std::string list;
    for (size_t i = 0; i < names_.size(); ++i) list += (i ? ", " : "") + std::string(names_[i]);
    throw py::value_error(function_ + ": outputs must hold " + std::to_string(names_.size()) + " arrays (" + list +
                          "), got " + std::to_string(given_->size()));
  }
}

py::array Outputs::take(size_t i, const py::dtype& dtype, const std::vector<py::ssize_t>& shape) const {
  if (!given_) return py::array(dtype, shape);
  const std::string name = function_ + ": outputs[" + std::to_string(i) + "] (" + names_[i] + ")";
  py::object obj = (*given_)[i];
  if (!py::isinstance<py::array>(obj)) throw py::value_error(name + " must be a NumPy array");
  py::array a = obj.cast<py::array>();
  const std::string want = py::str(dtype.attr("name")), got = py::str(a.dtype().attr("name"));
  if (want != got) throw py::value_error(name + " must be " + want + ", got " + got);
  const core::Dims want_shape = core::Dims::from(static_cast<int>(shape.size()), [&](int d) { return shape[d]; });
  if (!(dims_of(a) == want_shape)) {
    throw py::value_error(name + " must have shape " + core::dims_string(want_shape) + ", got " + shape_str(a));
  }
  require_contiguous(a, name.c_str());
  if (!a.writeable()) throw py::value_error(name + " must be writeable");
  return a;
}

py::array Outputs::take(size_t i, DType dtype, const std::vector<py::ssize_t>& shape) const {
  return take(i, dtype_object(dtype), shape);
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
  // Dynamic scheduling: the workers claim runs of about total / (4 workers)
  // units from a shared counter, so a worker on a busy core takes fewer of
  // them instead of holding everyone up (the kernels' results do not depend
  // on the split).
  ctx.parallel_for = [num_threads](int64_t total, int64_t, const std::function<void(int64_t, int64_t)>& fn) {
    if (total <= 0) return;
    const int64_t workers = std::min<int64_t>(num_threads, total);
    if (workers == 1) {
      fn(0, total);
      return;
    }
    const int64_t grain = std::max<int64_t>(1, total / (4 * workers));
    std::atomic<int64_t> next{0};
    FirstException failed;
    const auto work = [&] {
      for (int64_t begin; (begin = next.fetch_add(grain)) < total;) {
        failed.run([&] { fn(begin, std::min(total, begin + grain)); });
      }
    };
    std::vector<std::thread> threads;
    threads.reserve(workers - 1);
    for (int64_t w = 1; w < workers; ++w) threads.emplace_back(work);
    work();
    for (auto& t : threads) t.join();
    failed.rethrow();
  };
  return ctx;
}

core::ExecContext cpu_exec(int num_threads) {
  core::ExecContext e;
  e.backend = core::Backend::kCpu;
  e.cpu = thread_context(num_threads);
  return e;
}

void check(const Status& s) {
  switch (s.code()) {
    case StatusCode::kOk: return;
    case StatusCode::kInvalidArgument: throw py::value_error(s.message());
    case StatusCode::kResourceExhausted: throw std::bad_alloc();  // MemoryError
    case StatusCode::kUnavailable:
    case StatusCode::kInternal: break;
  }
  throw std::runtime_error(s.message());
}

}  // namespace python
}  // namespace tf_fastattn

PYBIND11_MODULE(_C, m) {
  m.doc() = "tf_fastattn kernel core on NumPy arrays (no TensorFlow)";
  m.def("cpu_features", [] {
    // The kernels' own detection (cpu::cpu_features).
    const tf_fastattn::cpu::CpuFeatures& c = tf_fastattn::cpu::cpu_features();
    std::vector<std::string> f;
    if (c.avx2) f.push_back("avx2");
    if (c.fma) f.push_back("fma");
    if (c.avx512) f.push_back("avx512f");
    if (c.avx512bf16) f.push_back("avx512bf16");
    // The attention's bfloat16 products on AMX tiles (granted by the OS,
    // not turned off by TF_FASTATTN_CPU_AMX=0).
    if (tf_fastattn::cpu::amx_enabled()) f.push_back("amx-bf16");
    return f;
  }, "CPU features the kernels dispatch on, from the kernels' own detection.");
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
  {
    std::vector<std::string> tiers;
    for (auto t : tf_fastattn::cpu::kCpuTiers) tiers.push_back(tf_fastattn::cpu::cpu_tier_name(t));
    m.attr("CPU_ISA_VALUES") = pybind11::tuple(pybind11::cast(tiers));
  }
  tf_fastattn::python::register_layer_norm(m);
  tf_fastattn::python::register_attention(m);
  tf_fastattn::python::register_gpu(m);
}
