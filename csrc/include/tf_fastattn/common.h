// Framework-free types shared by every kernel and front end of tf_fastattn.
//
// Nothing here includes TensorFlow, pybind11 or CUDA headers: the kernel core
// sees only POD params structs, a DType tag, a Status and an execution context.
// (Host only: the headers NVRTC compiles, dtype.h and attention_params.h,
// include none of <string> and <functional>.)
#pragma once

#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <utility>

#include "tf_fastattn/dtype.h"

namespace tf_fastattn {

// Result of a validation or a launch, with a code that says whose problem it
// is. Front ends map the codes to their own errors:
//   kInvalidArgument  bad input (shape, dtype, attribute)   TF InvalidArgument, Python ValueError
//   kUnavailable      something missing from the machine    TF Unavailable,     Python RuntimeError
//                     (CUDA driver, NVRTC, a device the
//                     kernels support, a writable cache)
//   kInternal         a failure that is not the caller's    TF Internal,        Python RuntimeError
//                     (NVRTC compile error, CUDA driver
//                     call failing, a kernel resource limit)
//   kResourceExhausted  out of memory (a CPU kernel's       TF ResourceExhausted, Python MemoryError
//                     scratch buffers)
enum class StatusCode : int { kOk = 0, kInvalidArgument = 1, kUnavailable = 2, kInternal = 3, kResourceExhausted = 4 };

class Status {
 public:
  Status() = default;
  static Status OK() { return Status(); }
  static Status Invalid(std::string message) { return Status(StatusCode::kInvalidArgument, std::move(message)); }
  static Status Unavailable(std::string message) { return Status(StatusCode::kUnavailable, std::move(message)); }
  static Status Internal(std::string message) { return Status(StatusCode::kInternal, std::move(message)); }
  static Status ResourceExhausted(std::string message) {
    return Status(StatusCode::kResourceExhausted, std::move(message));
  }
  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

#define TFA_RETURN_IF_ERROR(expr)          \
  do {                                     \
    ::tf_fastattn::Status _tfa_s = (expr); \
    if (!_tfa_s.ok()) return _tfa_s;       \
  } while (0)

// Work-sharing for CPU kernels, injected by the front end: TensorFlow's CPU
// worker pool inside an op, a small std::thread pool in the Python module.
// `parallel_for(total, cost_per_unit, fn)` calls fn(begin, end) on disjoint
// ranges that cover [0, total), possibly concurrently, and returns when all are
// done. `cost_per_unit` is a rough cycle count per unit that lets the pool
// decide how finely to split. Kernels never depend on how the range is split:
// results are bitwise identical for any thread count.
using ParallelFor =
    std::function<void(int64_t total, int64_t cost_per_unit, const std::function<void(int64_t, int64_t)>& fn)>;

// The first exception thrown by the parts of a parallel_for, kept for the
// caller: a worker thread of TensorFlow's or XLA's pool must not throw (the
// process would end), and every part must still count as done. The front
// ends' parallel_for run each part through run() and call rethrow() after
// the join; the core turns std::bad_alloc into kResourceExhausted.
class FirstException {
 public:
  template <typename F>
  void run(F&& f) noexcept {
    try {
      f();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!first_) first_ = std::current_exception();
    }
  }
  void rethrow() {
    if (first_) std::rethrow_exception(first_);
  }

 private:
  std::mutex mu_;
  std::exception_ptr first_;
};

struct CpuContext {
  ParallelFor parallel_for;
  // Number of threads the pool may use at once (a hint for scratch sizing).
  int num_threads = 1;
};

// Runs fn over [0, total) serially: the context for single-threaded callers.
inline CpuContext serial_cpu_context() {
  CpuContext ctx;
  ctx.parallel_for = [](int64_t total, int64_t, const std::function<void(int64_t, int64_t)>& fn) {
    if (total > 0) fn(0, total);
  };
  ctx.num_threads = 1;
  return ctx;
}

}  // namespace tf_fastattn
