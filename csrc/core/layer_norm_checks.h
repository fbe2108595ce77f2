// The layer norm's argument checks, shared by every front end (TensorFlow
// op, _C on NumPy arrays): the same bad input gets the same message.
#pragma once

#include <cstdint>

#include "core/attention_checks.h"  // Dims, dims_string
#include "tf_fastattn/common.h"

namespace tf_fastattn {
namespace core {

// x (or dy, named `name`) of rank >= 1 with a non-empty last axis: rows (the
// product of the other axes) and cols (the last axis).
Status layer_norm_rows(const Dims& x, const char* name, int64_t* rows, int64_t* cols);

// The saved statistics mean and rstd: `rows` elements each.
Status layer_norm_stats(const Dims& mean, const Dims& rstd, int64_t rows);

// A tensor that must have x's shape (residual, dsum, sum, dy).
Status same_shape_as(const Dims& t, const char* name, const Dims& x, const char* x_name);

// gamma or beta: [cols].
Status layer_norm_param(const Dims& p, const char* name, int64_t cols);

}  // namespace core
}  // namespace tf_fastattn
