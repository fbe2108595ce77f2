// _C.layer_norm_fwd / _C.layer_norm_bwd on NumPy arrays.
#include "core/dispatch.h"
#include "core/layer_norm_checks.h"
#include "python/common.h"
#include "tf_fastattn/layer_norm.h"

namespace tf_fastattn {
namespace python {
namespace {

// The element stride between rows of an array normalised over its last axis:
// any layout whose last axis is contiguous and whose leading axes collapse to
// one row index (a C-contiguous array, or a slice of the rows' columns such
// as x[:, :C] of a wider x); otherwise ValueError naming the argument.
int64_t row_stride_of(const py::array& a, const char* name) {
  const py::ssize_t item = a.itemsize(), nd = a.ndim();
  if (nd == 0 || a.size() == 0) return 0;  // 0: contiguous (nothing is read or written)
  const int64_t cols = a.shape(nd - 1);
  bool ok = cols <= 1 || a.strides(nd - 1) == item;
  // The leading axes of size > 1 (the others have no stride of their own)
  // must form one row index: each stride the next one's times its size.
  int64_t row = cols * item, inner_stride = 0, inner_size = 0;
  for (py::ssize_t i = nd - 2; ok && i >= 0; --i) {
    if (a.shape(i) == 1) continue;
    if (inner_size == 0) {
      row = a.strides(i);
    } else if (a.strides(i) != inner_stride * inner_size) {
      ok = false;
    }
    inner_stride = a.strides(i);
    inner_size = a.shape(i);
  }
  if (!ok || row % item != 0 || row / item < cols) {
    throw py::value_error(std::string(name) + " must have a contiguous last axis and rows a constant stride apart "
                          "(e.g. C-contiguous)");
  }
  return row / item;
}

struct RowView {
  int64_t rows = 0, cols = 0;
};

// The core's checks (core/layer_norm_checks.h): the messages of every front end.
RowView row_view(const py::array& x, const char* name) {
  RowView v;
  check(core::layer_norm_rows(dims_of(x), name, &v.rows, &v.cols));
  return v;
}

void require_same_shape(const py::array& a, const char* a_name, const py::array& b, const char* b_name) {
  check(core::same_shape_as(dims_of(b), b_name, dims_of(a), a_name));
}

// A [cols] parameter (gamma, beta) or null; its dtype must equal `other`'s
// when that is given too (the kernels read both as one param_dtype).
std::optional<DType> param_dtype_of(const std::optional<py::array>& p, const char* name, int64_t cols,
                                    std::optional<DType> other, const char* other_name) {
  if (!p) return other;
  check(core::layer_norm_param(dims_of(*p), name, cols));
  require_contiguous(*p, name);
  const DType t = dtype_of(*p, name);
  if (other && *other != t) {
    throw py::value_error(std::string(name) + " must have the dtype of " + other_name + " (" + dtype_name(*other) +
                          "), got " + dtype_name(t));
  }
  return t;
}

std::vector<py::ssize_t> shape_of(const py::array& a) { return {a.shape(), a.shape() + a.ndim()}; }

// "layer", "rms" or "rms_scaling" (NormKind).
int32_t norm_kind_of(const std::string& norm) {
  if (norm == "layer") return kLayerNorm;
  if (norm == "rms") return kRmsNorm;
  if (norm == "rms_scaling") return kRmsScaling;
  throw py::value_error("norm must be 'layer', 'rms' or 'rms_scaling', got '" + norm + "'");
}

py::tuple layer_norm_fwd(const py::array& x, std::optional<py::array> gamma, std::optional<py::array> beta,
                         std::optional<py::array> residual, double epsilon, int num_threads,
                         std::optional<py::tuple> outputs, const std::string& norm) {
  const Outputs out_arrays(outputs, "layer_norm_fwd", {"y", "sum", "mean", "rstd"});
  LayerNormFwdParams p;
  p.norm_kind = norm_kind_of(norm);
  p.dtype = dtype_of(x, "x");
  const RowView v = row_view(x, "x");
  p.rows = v.rows;
  p.cols = v.cols;
  // (Neither given: the dtype is never read.)
  p.param_dtype = param_dtype_of(beta, "beta", p.cols, param_dtype_of(gamma, "gamma", p.cols, {}, ""), "gamma")
                      .value_or(p.dtype);
  if (gamma) p.gamma = gamma->data();
  if (beta) p.beta = beta->data();
  if (residual) {
    require_same_shape(x, "x", *residual, "residual");
    if (dtype_of(*residual, "residual") != p.dtype) throw py::value_error("residual must have the dtype of x");
    p.residual = residual->data();
    p.residual_row_stride = row_stride_of(*residual, "residual");
  }
  p.x = x.data();
  p.x_row_stride = row_stride_of(x, "x");
  p.epsilon = epsilon;
  py::array y = out_arrays.take(0, x.dtype(), shape_of(x));
  py::array sum = out_arrays.take(1, x.dtype(), shape_of(x));
  std::vector<py::ssize_t> stat_shape(x.shape(), x.shape() + x.ndim() - 1);
  py::array mean = out_arrays.take(2, stats_dtype(p.dtype), stat_shape);
  py::array rstd = out_arrays.take(3, stats_dtype(p.dtype), stat_shape);
  p.y = y.mutable_data();
  p.sum = sum.mutable_data();
  p.mean = mean.mutable_data();
  p.rstd = rstd.mutable_data();
  Status s;
  {
    py::gil_scoped_release release;
    s = core::layer_norm_fwd(p, cpu_exec(num_threads));
  }
  check(s);
  return py::make_tuple(y, sum, mean, rstd);
}

py::tuple layer_norm_bwd(const py::array& dy, const py::array& sum, const py::array& mean, const py::array& rstd,
                         std::optional<py::array> gamma, std::optional<py::array> dsum, bool center,
                         std::optional<py::array> param_like, int num_threads, std::optional<py::tuple> outputs,
                         const std::string& norm) {
  const Outputs out_arrays(outputs, "layer_norm_bwd", {"dx", "dgamma", "dbeta"});
  require_contiguous(mean, "mean");
  require_contiguous(rstd, "rstd");
  require_same_shape(dy, "dy", sum, "sum");
  LayerNormBwdParams p;
  p.norm_kind = norm_kind_of(norm);
  p.dtype = dtype_of(dy, "dy");
  if (dtype_of(sum, "sum") != p.dtype) throw py::value_error("sum must have the dtype of dy");
  const RowView v = row_view(dy, "dy");
  p.rows = v.rows;
  p.cols = v.cols;
  check(core::layer_norm_stats(dims_of(mean), dims_of(rstd), p.rows));
  if (dtype_of(mean, "mean") != stats_dtype(p.dtype) || dtype_of(rstd, "rstd") != stats_dtype(p.dtype)) {
    throw py::value_error(std::string("mean and rstd must be ") + dtype_name(stats_dtype(p.dtype)));
  }
  std::optional<DType> like;
  if (param_like) like = dtype_of(*param_like, "param_like");
  p.param_dtype = param_dtype_of(gamma, "gamma", p.cols, like, "param_like").value_or(DType::kFloat32);
  if (gamma) p.gamma = gamma->data();
  if (dsum) {
    require_same_shape(dy, "dy", *dsum, "dsum");
    if (dtype_of(*dsum, "dsum") != p.dtype) throw py::value_error("dsum must have the dtype of dy");
    p.dsum = dsum->data();
    p.dsum_row_stride = row_stride_of(*dsum, "dsum");
  }
  p.dy = dy.data();
  p.sum = sum.data();
  p.dy_row_stride = row_stride_of(dy, "dy");
  p.sum_row_stride = row_stride_of(sum, "sum");
  p.mean = mean.data();
  p.rstd = rstd.data();
  py::array dx = out_arrays.take(0, dy.dtype(), shape_of(dy));
  py::array dgamma = out_arrays.take(1, p.param_dtype, {static_cast<py::ssize_t>(p.cols)});
  py::array dbeta = out_arrays.take(2, p.param_dtype, {static_cast<py::ssize_t>(p.cols)});
  const core::ExecContext exec = cpu_exec(num_threads);
  std::vector<char> workspace(core::layer_norm_bwd_workspace_bytes(p.rows, p.cols, p.dtype, exec));
  p.dx = dx.mutable_data();
  p.dgamma = gamma ? dgamma.mutable_data() : nullptr;
  p.dbeta = center ? dbeta.mutable_data() : nullptr;
  p.workspace = workspace.data();
  Status s;
  {
    py::gil_scoped_release release;
    s = core::layer_norm_bwd(p, exec);
  }
  check(s);
  return py::make_tuple(dx, gamma ? py::object(dgamma) : py::none(), center ? py::object(dbeta) : py::none());
}

}  // namespace

void register_layer_norm(py::module_& m) {
  using namespace pybind11::literals;
  m.def("layer_norm_fwd", &layer_norm_fwd,
        "Fused residual-add + layer norm over the last axis on the CPU.\n\n"
        "Returns (y, sum, mean, rstd): y = (s - mean) * rstd * gamma + beta with s = x + residual;\n"
        "mean and rstd are float32 (float64 for float64 x) of shape x.shape[:-1]. `outputs`: optional\n"
        "tuple of four preallocated C-contiguous arrays to write them into. norm='rms': RMS norm (mean\n"
        "= 0, y = s * rstd * gamma); norm='rms_scaling': y = s * rstd * gamma with the layer norm's rstd\n"
        "(Keras' rms_scaling); neither takes beta.",
        "x"_a, "gamma"_a = py::none(), "beta"_a = py::none(), "residual"_a = py::none(), "epsilon"_a = 1e-3,
        "num_threads"_a = 0, "outputs"_a = py::none(), py::kw_only(), "norm"_a = "layer");
  m.def("layer_norm_bwd", &layer_norm_bwd,
        "Backward of layer_norm_fwd. Returns (dx, dgamma, dbeta); dx is also the residual's gradient and\n"
        "includes dsum (the gradient reaching the sum output). dgamma is None without gamma, dbeta None\n"
        "when center is False. param_like gives the dtype of dgamma/dbeta when gamma is None. `outputs`:\n"
        "optional tuple of three preallocated arrays (dx, dgamma, dbeta; the last two of shape [cols]).",
        "dy"_a, "sum"_a, "mean"_a, "rstd"_a, "gamma"_a = py::none(), "dsum"_a = py::none(), "center"_a = true,
        "param_like"_a = py::none(), "num_threads"_a = 0, "outputs"_a = py::none(), py::kw_only(),
        "norm"_a = "layer");
}

}  // namespace python
}  // namespace tf_fastattn
