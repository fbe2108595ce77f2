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

// Every shape check of the forward's inputs, in this order: x (rows, cols),
// the residual (null: none) of x's shape, gamma when `scale` and beta when
// `center` of [cols].
Status layer_norm_fwd_inputs(const Dims& x, const Dims* residual, const Dims& gamma, const Dims& beta, bool center,
                             bool scale, int64_t* rows, int64_t* cols);

// Every shape check of the backward's inputs, in this order: dy (rows,
// cols), sum and dsum (null: none) of dy's shape, mean and rstd of `rows`
// elements, gamma when `scale` of [cols].
Status layer_norm_bwd_inputs(const Dims& dy, const Dims& sum, const Dims* dsum, const Dims& mean, const Dims& rstd,
                             const Dims& gamma, bool scale, int64_t* rows, int64_t* cols);

}  // namespace core
}  // namespace tf_fastattn
