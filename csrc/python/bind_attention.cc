// _C.attention_fwd / _C.attention_bwd on NumPy arrays.
#include <cmath>

#include "core/attention_checks.h"
#include "core/dispatch.h"
#include "python/common.h"
#include "tf_fastattn/attention.h"

namespace tf_fastattn {
namespace python {
namespace {

// The element strides of a [batch, seq, heads, dim] array: any layout whose
// last axis is contiguous (transposed and sliced views need no copy).
TensorStrides strides_of(const py::array& a, const char* name) {
  const py::ssize_t item = a.itemsize();
  if (a.size() == 0) return TensorStrides{};  // nothing is read or written (NumPy's strides are arbitrary)
  if (a.shape(3) > 1 && a.strides(3) != item) {
    throw py::value_error(std::string(name) + " must have a contiguous last axis (element stride 1), got " +
                          std::to_string(a.strides(3) / item));
  }
  int64_t st[3];
  int64_t contiguous = a.shape(3);
  for (int i = 2; i >= 0; --i) {
    if (a.strides(i) % item != 0) throw py::value_error(std::string(name) + "'s strides are not whole elements");
    // An axis of size 1 has no stride of its own: the contiguous one.
    st[i] = a.shape(i) == 1 ? contiguous : a.strides(i) / item;
    contiguous *= a.shape(i);
  }
  if (st[0] == 0 && st[1] == 0 && st[2] == 0) {
    throw py::value_error(std::string(name) + " is broadcast along every axis but the last (strides 0): pass a copy");
  }
  return TensorStrides{st[0], st[1], st[2]};
}

// The core's checks (core/attention_checks.h): the messages of every front end.
AttentionShape shape_of(const py::array& q, const py::array& k, const py::array& v) {
  AttentionShape s;
  check(core::attention_shape(dims_of(q), dims_of(k), dims_of(v), &s));
  const DType t = dtype_of(q, "query");
  if (dtype_of(k, "key") != t || dtype_of(v, "value") != t) {
    throw py::value_error("query, key and value must have the same dtype");
  }
  return s;
}

// A bool mask of rank <= 4 broadcastable to [B, N, T, S] (left-padded with
// 1s); any strides (np.broadcast_to views included).
const bool* mask_view(const std::optional<py::array>& mask, const AttentionShape& s, MaskStrides* st) {
  if (!mask) return nullptr;
  const py::array& m = *mask;
  if (py::str(m.dtype().attr("name")).cast<std::string>() != "bool") {
    throw py::value_error("mask must be bool, got " + py::str(m.dtype().attr("name")).cast<std::string>());
  }
  int64_t dims[4];
  check(core::attention_mask_dims(dims_of(m), s, dims));
  int64_t strides[4];
  const int pad = 4 - static_cast<int>(m.ndim());
  for (int i = 0; i < 4; ++i) {
    strides[i] = (i < pad || dims[i] == 1) ? 0 : m.strides(i - pad) / static_cast<py::ssize_t>(sizeof(bool));
  }
  *st = MaskStrides{strides[0], strides[1], strides[2], strides[3]};
  return static_cast<const bool*>(m.data());
}

double resolve_scale(std::optional<double> scale, const AttentionShape& s) {
  return scale ? *scale : 1.0 / std::sqrt(static_cast<double>(s.head_dim > 0 ? s.head_dim : 1));
}

// What both directions share: the problem, q, k, v (any layout with a
// contiguous last axis), the mask and the options.
// The LLM options: a sliding window (left, right; -1 = unbounded), the query
// offset and the logit soft cap.
struct BandOptions {
  std::pair<int64_t, int64_t> window{-1, -1};
  int64_t query_offset = 0;
  double logits_soft_cap = 0.0;
};

void fill_shared(AttentionParams* p, const py::array& q, const py::array& k, const py::array& v,
                 const std::optional<py::array>& mask, std::optional<double> scale, bool is_causal,
                 double dropout_rate, uint64_t seed, const BandOptions& band) {
  p->shape = shape_of(q, k, v);
  p->dtype = dtype_of(q, "query");
  p->mask = mask_view(mask, p->shape, &p->mask_strides);
  p->scale = resolve_scale(scale, p->shape);
  p->is_causal = is_causal;
  p->window_left = band.window.first;
  p->window_right = band.window.second;
  p->query_offset = band.query_offset;
  p->logits_soft_cap = band.logits_soft_cap;
  p->dropout_rate = dropout_rate;
  p->seed = seed;
  p->q = q.data();
  p->k = k.data();
  p->v = v.data();
  p->q_strides = strides_of(q, "query");
  p->k_strides = strides_of(k, "key");
  p->v_strides = strides_of(v, "value");
}

py::tuple attention_fwd(const py::array& q, const py::array& k, const py::array& v, std::optional<py::array> mask,
                        std::optional<double> scale, bool is_causal, double dropout_rate, uint64_t seed,
                        int num_threads, std::optional<py::tuple> outputs, std::pair<int64_t, int64_t> window,
                        int64_t query_offset, double logits_soft_cap) {
  const Outputs out_arrays(outputs, "attention_fwd", {"out", "lse"});
  AttentionFwdParams p;
  fill_shared(&p, q, k, v, mask, scale, is_causal, dropout_rate, seed, {window, query_offset, logits_soft_cap});
  const AttentionShape& s = p.shape;
  py::array o = out_arrays.take(0, q.dtype(), {s.batch, s.seqlen_q, s.num_heads, s.head_dim_v});
  py::array lse = out_arrays.take(1, stats_dtype(p.dtype), {s.batch, s.num_heads, s.seqlen_q});
  p.o = o.mutable_data();
  p.lse = lse.mutable_data();
  Status st;
  {
    py::gil_scoped_release release;
    st = core::attention_fwd(p, cpu_exec(num_threads));
  }
  check(st);
  return py::make_tuple(o, lse);
}

py::tuple attention_bwd(const py::array& q, const py::array& k, const py::array& v, const py::array& o,
                        const py::array& lse, const py::array& d_o, std::optional<py::array> mask,
                        std::optional<double> scale, bool is_causal, double dropout_rate, uint64_t seed,
                        int num_threads, std::optional<py::tuple> outputs, std::pair<int64_t, int64_t> window,
                        int64_t query_offset, double logits_soft_cap) {
  const Outputs out_arrays(outputs, "attention_bwd", {"dquery", "dkey", "dvalue"});
  AttentionBwdParams p;
  fill_shared(&p, q, k, v, mask, scale, is_causal, dropout_rate, seed, {window, query_offset, logits_soft_cap});
  const AttentionShape& s = p.shape;
  check(core::attention_bwd_inputs(dims_of(o), dims_of(lse), dims_of(d_o), s));
  if (dtype_of(o, "out") != p.dtype || dtype_of(d_o, "d_out") != p.dtype) {
    throw py::value_error("out and d_out must have the dtype of query");
  }
  require_contiguous(lse, "lse");
  if (dtype_of(lse, "lse") != stats_dtype(p.dtype)) {
    throw py::value_error(std::string("lse must be ") + dtype_name(stats_dtype(p.dtype)));
  }
  p.o = o.data();
  p.lse = lse.data();
  p.do_ = d_o.data();
  p.o_strides = strides_of(o, "out");
  p.do_strides = strides_of(d_o, "d_out");
  py::array dq = out_arrays.take(0, q.dtype(), {s.batch, s.seqlen_q, s.num_heads, s.head_dim});
  py::array dk = out_arrays.take(1, k.dtype(), {s.batch, s.seqlen_k, s.num_heads_kv, s.head_dim});
  py::array dv = out_arrays.take(2, v.dtype(), {s.batch, s.seqlen_k, s.num_heads_kv, s.head_dim_v});
  p.dq = dq.mutable_data();
  p.dk = dk.mutable_data();
  p.dv = dv.mutable_data();
  const core::ExecContext exec = cpu_exec(num_threads);
  std::vector<char> workspace(core::attention_bwd_workspace_bytes(s, p.dtype, exec));
  p.workspace = workspace.data();
  Status st;
  {
    py::gil_scoped_release release;
    st = core::attention_bwd(p, exec);
  }
  check(st);
  return py::make_tuple(dq, dk, dv);
}

}  // namespace

void register_attention(py::module_& m) {
  using namespace pybind11::literals;
  m.attr("MAX_HEAD_DIM") = kMaxHeadDim;
  m.def("attention_flops", &tf_fastattn::attention_flops,
        "FlashAttention's FLOP count: forward 4 B N T S H (halved when causal); forward + backward 3.5x.",
        "batch"_a, "heads"_a, "seqlen_q"_a, "seqlen_k"_a, "head_dim"_a, "is_causal"_a, "backward"_a);
  m.def("attention_fwd", &attention_fwd,
        "Fused scaled-dot-product attention on the CPU.\n\n"
        "query [B, T, N, H], key [B, S, Nkv, H], value [B, S, Nkv, Hv], in any layout whose last axis is\n"
        "contiguous (transposed or sliced views are read in place); mask: bool, rank <= 4, broadcastable\n"
        "to [B, N, T, S] (True = attend); window (left, right): query t sees keys t + query_offset - left ..\n"
        "t + query_offset + right (-1 = unbounded); query_offset: query row t sits at position\n"
        "t + query_offset (causal and window); logits_soft_cap > 0: logits = cap * tanh(logits / cap).\n"
        "Returns (out [B, T, N, Hv], lse [B, N, T]), written into `outputs` (a tuple of two\n"
        "preallocated C-contiguous arrays) when given.",
        "query"_a, "key"_a, "value"_a, "mask"_a = py::none(), "scale"_a = py::none(), "is_causal"_a = false,
        "dropout_rate"_a = 0.0, "seed"_a = 0, "num_threads"_a = 0, "outputs"_a = py::none(), py::kw_only(),
        "window"_a = std::make_pair(int64_t(-1), int64_t(-1)), "query_offset"_a = 0, "logits_soft_cap"_a = 0.0);
  m.def("attention_bwd", &attention_bwd,
        "Backward of attention_fwd: returns (dquery, dkey, dvalue), recomputing probabilities from lse;\n"
        "written into `outputs` (a tuple of three preallocated C-contiguous arrays) when given.",
        "query"_a, "key"_a, "value"_a, "out"_a, "lse"_a, "d_out"_a, "mask"_a = py::none(), "scale"_a = py::none(),
        "is_causal"_a = false, "dropout_rate"_a = 0.0, "seed"_a = 0, "num_threads"_a = 0, "outputs"_a = py::none(),
        py::kw_only(), "window"_a = std::make_pair(int64_t(-1), int64_t(-1)), "query_offset"_a = 0,
        "logits_soft_cap"_a = 0.0);
}

}  // namespace python
}  // namespace tf_fastattn
