// Helpers shared by the pybind11 bindings of tf_fastattn._C (no TensorFlow).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "core/attention_checks.h"
#include "core/dispatch.h"

#include "tf_fastattn/common.h"

namespace tf_fastattn {
namespace python {

namespace py = pybind11;

// Maps a NumPy dtype to a kernel DType. bfloat16 arrays come from ml_dtypes
// (the type TensorFlow's .numpy() returns).
DType dtype_of(const py::array& a, const char* name);

// A new NumPy array of dtype t (bfloat16 from ml_dtypes) and `shape`.
py::array empty_of(DType t, const std::vector<py::ssize_t>& shape);

// Caller-provided output arrays (the `outputs` argument of the CPU
// functions): a tuple of `count` arrays, or None. Tests fill them with NaN
// first, so an element a kernel fails to write shows up.
class Outputs {
 public:
  Outputs(const std::optional<py::tuple>& given, const char* function, std::vector<const char*> names);
  // Output i: the given array, checked against `dtype` and `shape`
  // (C-contiguous, writeable), or a new array of that dtype and shape.
  py::array take(size_t i, const py::dtype& dtype, const std::vector<py::ssize_t>& shape) const;
  py::array take(size_t i, DType dtype, const std::vector<py::ssize_t>& shape) const;

 private:
  std::optional<py::tuple> given_;
  std::string function_;
  std::vector<const char*> names_;
};

py::dtype dtype_object(DType t);

// An array's shape for the core's argument checks (core/attention_checks.h).
core::Dims dims_of(const py::array& a);

// Requires a C-contiguous array; raises ValueError naming the argument.
void require_contiguous(const py::array& a, const char* name);

std::string shape_str(const py::array& a);

// A CPU context that splits parallel_for ranges over `num_threads` std::threads
// (0 = hardware concurrency).
CpuContext thread_context(int num_threads);

// The core's execution contexts for the CPU functions (thread_context) and
// the GPU launchers (a CUstream as an int, the attention family by name).
core::ExecContext cpu_exec(int num_threads);

// Raises the Python error of a failed Status: ValueError for an invalid
// argument, RuntimeError for an unavailable resource or an internal failure.
void check(const Status& s);

void register_layer_norm(py::module_& m);
void register_attention(py::module_& m);
void register_gpu(py::module_& m);  // bind_gpu.cc

}  // namespace python
}  // namespace tf_fastattn
