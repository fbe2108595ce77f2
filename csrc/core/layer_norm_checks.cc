#include "core/layer_norm_checks.h"

namespace tf_fastattn {
namespace core {

Status layer_norm_rows(const Dims& x, const char* name, int64_t* rows, int64_t* cols) {
  const std::string n = name;
  if (x.rank < 1) return Status::Invalid(n + " must have rank >= 1, got shape " + dims_string(x));
  if (x.rank > Dims::kMaxRank) {
    return Status::Invalid(n + " must have rank <= " + std::to_string(Dims::kMaxRank) + ", got rank " +
                           std::to_string(x.rank));
  }
  *cols = x.size[x.rank - 1];
  if (*cols < 1) return Status::Invalid("the last axis of " + n + " must be non-empty, got shape " + dims_string(x));
  int64_t r = 1;
  for (int i = 0; i < x.rank - 1; ++i) r *= x.size[i];
  *rows = r;
  return Status::OK();
}

Status layer_norm_stats(const Dims& mean, const Dims& rstd, int64_t rows) {
  const auto count = [](const Dims& d) {
    int64_t c = 1;
    for (int i = 0; i < d.rank && i < Dims::kMaxRank; ++i) c *= d.size[i];
    return c;
  };
  if (count(mean) == rows && count(rstd) == rows) return Status::OK();
  return Status::Invalid("mean and rstd must have " + std::to_string(rows) + " elements (one per row), got shapes " +
                         dims_string(mean) + " and " + dims_string(rstd));
}

Status same_shape_as(const Dims& t, const char* name, const Dims& x, const char* x_name) {
  if (t == x) return Status::OK();
  return Status::Invalid(std::string(name) + " must have the shape of " + x_name + " " + dims_string(x) + ", got " +
                         dims_string(t));
}

Status layer_norm_param(const Dims& p, const char* name, int64_t cols) {
  if (p.rank == 1 && p.size[0] == cols) return Status::OK();
  return Status::Invalid(std::string(name) + " must have shape [" + std::to_string(cols) +
                         "] (the last axis of x), got " + dims_string(p));
}

Status layer_norm_fwd_inputs(const Dims& x, const Dims* residual, const Dims& gamma, const Dims& beta, bool center,
                             bool scale, int64_t* rows, int64_t* cols) {
  TFA_RETURN_IF_ERROR(layer_norm_rows(x, "x", rows, cols));
  if (residual) TFA_RETURN_IF_ERROR(same_shape_as(*residual, "residual", x, "x"));
  if (scale) TFA_RETURN_IF_ERROR(layer_norm_param(gamma, "gamma", *cols));
  if (center) TFA_RETURN_IF_ERROR(layer_norm_param(beta, "beta", *cols));
  return Status::OK();
}

Status layer_norm_bwd_inputs(const Dims& dy, const Dims& sum, const Dims* dsum, const Dims& mean, const Dims& rstd,
                             const Dims& gamma, bool scale, int64_t* rows, int64_t* cols) {
  TFA_RETURN_IF_ERROR(layer_norm_rows(dy, "dy", rows, cols));
  TFA_RETURN_IF_ERROR(same_shape_as(sum, "sum", dy, "dy"));
  if (dsum) TFA_RETURN_IF_ERROR(same_shape_as(*dsum, "dsum", dy, "dy"));
  TFA_RETURN_IF_ERROR(layer_norm_stats(mean, rstd, *rows));
  if (scale) TFA_RETURN_IF_ERROR(layer_norm_param(gamma, "gamma", *cols));
  return Status::OK();
}

}  // namespace core
}  // namespace tf_fastattn
