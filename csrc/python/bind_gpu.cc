// _C GPU functions: runtime diagnostics, kernel compilation (no GPU needed),
// and the CUDA launchers on raw device pointers + a stream, so the kernels
// can be tested with PyTorch or CuPy tensors and no TensorFlow.
#include <chrono>

#include "core/attention_checks.h"
#include "python/common.h"
#include "runtime/compiler.h"
#include "runtime/cuda_api.h"
#include "runtime/variants.h"
#include "tf_fastattn/gpu.h"

namespace tf_fastattn {
namespace python {
namespace {

py::dict runtime_info() {
  py::dict d;
  const gpu::Driver* drv = nullptr;
  const Status ds = gpu::driver(&drv);
  d["driver"] = ds.ok() ? py::str(drv->path + " " + std::to_string(drv->version)) : py::str("unavailable");
  d["driver_error"] = ds.ok() ? py::none() : py::object(py::str(ds.message()));
  d["nvrtc_candidates"] = gpu::nvrtc_candidates();
  const gpu::Nvrtc* nv = nullptr;
  const Status ns = gpu::nvrtc_for_arch(75, &nv);
  d["nvrtc"] = ns.ok() ? py::object(py::str(nv->path)) : py::none();
  d["nvrtc_version"] = ns.ok() ? py::object(py::int_(nv->version())) : py::none();
  d["nvrtc_archs"] = ns.ok() ? nv->archs : std::vector<int>();
  d["nvrtc_error"] = ns.ok() ? py::none() : py::object(py::str(ns.message()));
  d["cache_dir"] = gpu::cache_dir();
  const Status all = gpu_runtime_status();
  d["ok"] = all.ok();
  d["reason"] = all.ok() ? py::none() : py::object(py::str(all.message()));
  return d;
}

py::list variants(int arch) {
  py::list out;
  for (const gpu::VariantInfo& v : gpu::all_variants(arch)) {
    py::dict d;
    d["name"] = v.variant.name();
    d["op"] = v.op;
    d["family"] = v.family;
    d["dtype"] = v.dtype;
    d["direction"] = v.direction;
    d["head_dim"] = v.head_dim;
    out.append(d);
  }
  return out;
}

py::dict compile(int arch, const std::string& name, bool use_cache) {
  const gpu::KernelVariant* found = nullptr;
  const std::vector<gpu::VariantInfo> all = gpu::all_variants(arch);
  for (const gpu::VariantInfo& v : all) {
    if (v.variant.name() == name) found = &v.variant;
  }
  if (!found) throw py::value_error("no variant named " + name + " for sm_" + std::to_string(arch));
  gpu::CompiledVariant c;
  Status s;
  const auto t0 = std::chrono::steady_clock::now();
  {
    py::gil_scoped_release release;
    s = gpu::compile_variant(*found, arch, use_cache, &c);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  check(s);
  py::dict d;
  d["name"] = name;
  d["target"] = c.target;
  d["is_ptx"] = c.is_ptx;
  d["image_bytes"] = c.image.size();
  d["nvrtc"] = c.nvrtc_path;
  d["nvrtc_version"] = c.nvrtc_version;
  d["from_cache"] = c.from_cache;
  d["cache_file"] = c.cache_file;
  d["seconds"] = seconds;
  d["log"] = c.log;
  py::list res;
  for (const gpu::KernelResources& k : c.resources) {
    py::dict r;
    r["function"] = k.function;
    r["registers"] = k.registers;
    r["static_smem_bytes"] = k.static_smem_bytes;
    r["stack_bytes"] = k.stack_bytes;
    r["spill_store_bytes"] = k.spill_store_bytes;
    r["spill_load_bytes"] = k.spill_load_bytes;
    res.append(r);
  }
  d["kernels"] = res;
  return d;
}

DType dtype_named(const std::string& name, const char* arg) {
  for (DType t : {DType::kFloat16, DType::kBFloat16, DType::kFloat32, DType::kFloat64}) {
    if (name == dtype_name(t)) return t;
  }
  throw py::value_error(std::string(arg) + " must be float16, bfloat16, float32 or float64, got " + name);
}

AttentionFamily family_named(const std::string& name) {
  if (name == "auto") return AttentionFamily::kAuto;
  if (name == "simt") return AttentionFamily::kSimt;
  if (name == "tensor_core") return AttentionFamily::kTensorCore;
  throw py::value_error("family must be 'auto', 'simt' or 'tensor_core', got '" + name + "'");
}

core::ExecContext gpu_ctx(uintptr_t stream, const std::string& family = "auto") {
  core::ExecContext e;
  e.backend = core::Backend::kGpu;
  e.gpu.stream = reinterpret_cast<void*>(stream);
  e.gpu.attention_family = family_named(family);
  return e;
}

// Launches without the GIL: a first call compiles (seconds).
template <typename F>
void run(F f) {
  Status s;
  {
    py::gil_scoped_release release;
    s = f();
  }
  check(s);
}

// A pointer field as a Python int (0 = null): device pointers such as
// torch's t.data_ptr(), or host pointers under the CUDA emulator.
template <typename Cls, typename Base, typename Ptr>
void pointer_property(py::class_<Cls>& c, const char* name, Ptr Base::*field) {
  c.def_property(
      name, [field](const Cls& p) { return reinterpret_cast<uintptr_t>(p.*field); },
      [field](Cls& p, uintptr_t v) { p.*field = reinterpret_cast<Ptr>(v); });
}

template <typename Cls, typename Base>
void dtype_property(py::class_<Cls>& c, const char* name, DType Base::*field) {
  c.def_property(
      name, [field](const Cls& p) { return std::string(dtype_name(p.*field)); },
      [field, name](Cls& p, const std::string& v) { p.*field = dtype_named(v, name); });
}

// Cls(**fields): every keyword sets the field of that name (an unknown name
// raises AttributeError).
template <typename Cls>
void keyword_init(py::class_<Cls>& c) {
  c.def(py::init([](const py::kwargs& fields) {
    Cls p;
    py::object view = py::cast(&p, py::return_value_policy::reference);
    for (const auto& f : fields) py::setattr(view, f.first, f.second);
    return p;
  }));
}

// Element strides (batch, seq, head) of a [batch, seq, heads, dim] tensor;
// (0, 0, 0), the default, means contiguous.
template <typename Cls, typename Base>
void strides_property(py::class_<Cls>& c, const char* name, TensorStrides Base::*field) {
  c.def_property(
      name, [field](const Cls& p) { return py::make_tuple((p.*field).batch, (p.*field).seq, (p.*field).head); },
      [field, name](Cls& p, const std::vector<int64_t>& s) {
        if (s.size() != 3) throw py::value_error(std::string(name) + " must be 3 element strides (batch, seq, head)");
        p.*field = TensorStrides{s[0], s[1], s[2]};
      });
}

// The fields both attention directions share (tf_fastattn/attention_params.h).
template <typename Cls>
void attention_fields(py::class_<Cls>& c) {
  keyword_init(c);
  dtype_property(c, "dtype", &AttentionParams::dtype);
  c.def_readwrite("shape", &AttentionParams::shape);
  pointer_property(c, "q", &AttentionParams::q);
  pointer_property(c, "k", &AttentionParams::k);
  pointer_property(c, "v", &AttentionParams::v);
  pointer_property(c, "mask", &AttentionParams::mask);
  strides_property(c, "q_strides", &AttentionParams::q_strides);
  strides_property(c, "k_strides", &AttentionParams::k_strides);
  strides_property(c, "v_strides", &AttentionParams::v_strides);
  c.def_property(
      "mask_strides",
      [](const Cls& p) {
        const MaskStrides& m = p.mask_strides;
        return py::make_tuple(m.batch, m.head, m.row, m.col);
      },
      [](Cls& p, const std::vector<int64_t>& s) {
        if (s.size() != 4) throw py::value_error("mask_strides must be 4 element strides (b, n, t, s)");
        p.mask_strides = MaskStrides{s[0], s[1], s[2], s[3]};
      });
  c.def_readwrite("scale", &AttentionParams::scale);
  c.def_readwrite("is_causal", &AttentionParams::is_causal);
  c.def_readwrite("window_left", &AttentionParams::window_left);
  c.def_readwrite("window_right", &AttentionParams::window_right);
  c.def_readwrite("query_offset", &AttentionParams::query_offset);
  c.def_readwrite("logits_soft_cap", &AttentionParams::logits_soft_cap);
  // The device address of an int32 query offset the kernels read instead (0 = none).
  pointer_property(c, "query_offset_device", &AttentionParams::query_offset_device);
  c.def_readwrite("dropout_rate", &AttentionParams::dropout_rate);
  c.def_readwrite("seed", &AttentionParams::seed);
  // The device address of an 8-byte seed the kernels read instead (0 = none).
  pointer_property(c, "seed_device", &AttentionParams::seed_device);
}

// The fields both layer-norm directions have (tf_fastattn/layer_norm_params.h).
template <typename Cls>
void layer_norm_fields(py::class_<Cls>& c) {
  keyword_init(c);
  dtype_property(c, "dtype", &Cls::dtype);
  dtype_property(c, "param_dtype", &Cls::param_dtype);
  c.def_readwrite("rows", &Cls::rows);
  c.def_readwrite("cols", &Cls::cols);
  c.def_readwrite("norm_kind", &Cls::norm_kind);  // NormKind: 0 layer norm, 1 RMS norm, 2 rms_scaling
}

template <typename Cls, typename Base, typename Ptr>
void pointer_properties(py::class_<Cls>& c, std::initializer_list<std::pair<const char*, Ptr Base::*>> fields) {
  for (const auto& f : fields) pointer_property(c, f.first, f.second);
}

void bind_params(py::module_& m) {
  using namespace pybind11::literals;
  py::class_<AttentionShape>(m, "AttentionShape", "The attention problem's sizes (the glossary of attention.h).")
      .def(py::init([](int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t num_heads, int64_t num_heads_kv,
                       int64_t head_dim, int64_t head_dim_v) {
             return AttentionShape{batch, seqlen_q, seqlen_k, num_heads, num_heads_kv, head_dim, head_dim_v};
           }),
           "batch"_a, "seqlen_q"_a, "seqlen_k"_a, "num_heads"_a, "num_heads_kv"_a, "head_dim"_a, "head_dim_v"_a)
      .def_readwrite("batch", &AttentionShape::batch)
      .def_readwrite("seqlen_q", &AttentionShape::seqlen_q)
      .def_readwrite("seqlen_k", &AttentionShape::seqlen_k)
      .def_readwrite("num_heads", &AttentionShape::num_heads)
      .def_readwrite("num_heads_kv", &AttentionShape::num_heads_kv)
      .def_readwrite("head_dim", &AttentionShape::head_dim)
      .def_readwrite("head_dim_v", &AttentionShape::head_dim_v);

  py::class_<AttentionFwdParams> fwd(m, "AttentionFwdParams",
                                     "Arguments of attention_fwd_gpu: q [B, T, N, H], k [B, S, Nkv, H], v [B, S, Nkv, "
                                     "Hv] in, o [B, T, N, Hv] and lse [B, N, T] float32 out, as pointers (ints).");
  attention_fields(fwd);
  pointer_property(fwd, "o", &AttentionFwdParams::o);
  pointer_property(fwd, "lse", &AttentionFwdParams::lse);
  strides_property(fwd, "o_strides", &AttentionFwdParams::o_strides);

  py::class_<AttentionBwdParams> bwd(m, "AttentionBwdParams",
                                     "Arguments of attention_bwd_gpu: the forward's inputs, o, lse and do_ (dO) in; dq, "
                                     "dk, dv out; workspace of attention_bwd_workspace_bytes_gpu bytes.");
  attention_fields(bwd);
  pointer_properties<AttentionBwdParams, AttentionBwdParams, const void*>(
      bwd, {{"o", &AttentionBwdParams::o}, {"lse", &AttentionBwdParams::lse}, {"do_", &AttentionBwdParams::do_}});
  pointer_properties<AttentionBwdParams, AttentionBwdParams, void*>(
      bwd, {{"dq", &AttentionBwdParams::dq}, {"dk", &AttentionBwdParams::dk}, {"dv", &AttentionBwdParams::dv},
            {"workspace", &AttentionBwdParams::workspace}});
  for (auto f : {std::make_pair("o_strides", &AttentionBwdParams::o_strides),
                 std::make_pair("do_strides", &AttentionBwdParams::do_strides),
                 std::make_pair("dq_strides", &AttentionBwdParams::dq_strides),
                 std::make_pair("dk_strides", &AttentionBwdParams::dk_strides),
                 std::make_pair("dv_strides", &AttentionBwdParams::dv_strides)}) {
    strides_property(bwd, f.first, f.second);
  }

  py::class_<LayerNormFwdParams> lf(m, "LayerNormFwdParams",
                                    "Arguments of layer_norm_fwd_gpu over [rows, cols]: x, residual (0 = none), gamma, "
                                    "beta in; y, sum (0 = not written), mean, rstd out, as pointers (ints).");
  layer_norm_fields(lf);
  lf.def_readwrite("epsilon", &LayerNormFwdParams::epsilon);
  // Element strides between rows (0 = cols, contiguous).
  lf.def_readwrite("x_row_stride", &LayerNormFwdParams::x_row_stride);
  lf.def_readwrite("residual_row_stride", &LayerNormFwdParams::residual_row_stride);
  lf.def_readwrite("y_row_stride", &LayerNormFwdParams::y_row_stride);
  lf.def_readwrite("sum_row_stride", &LayerNormFwdParams::sum_row_stride);
  pointer_properties<LayerNormFwdParams, LayerNormFwdParams, const void*>(
      lf, {{"x", &LayerNormFwdParams::x}, {"residual", &LayerNormFwdParams::residual},
           {"gamma", &LayerNormFwdParams::gamma}, {"beta", &LayerNormFwdParams::beta}});
  pointer_properties<LayerNormFwdParams, LayerNormFwdParams, void*>(
      lf, {{"y", &LayerNormFwdParams::y}, {"sum", &LayerNormFwdParams::sum}, {"mean", &LayerNormFwdParams::mean},
           {"rstd", &LayerNormFwdParams::rstd}});

  py::class_<LayerNormBwdParams> lb(m, "LayerNormBwdParams",
                                    "Arguments of layer_norm_bwd_gpu: dy, dsum (0 = none), sum, gamma, mean, rstd in; "
                                    "dx, dgamma, dbeta out; workspace of layer_norm_bwd_workspace_bytes_gpu bytes.");
  layer_norm_fields(lb);
  lb.def_readwrite("dy_row_stride", &LayerNormBwdParams::dy_row_stride);
  lb.def_readwrite("dsum_row_stride", &LayerNormBwdParams::dsum_row_stride);
  lb.def_readwrite("sum_row_stride", &LayerNormBwdParams::sum_row_stride);
  lb.def_readwrite("dx_row_stride", &LayerNormBwdParams::dx_row_stride);
  pointer_properties<LayerNormBwdParams, LayerNormBwdParams, const void*>(
      lb, {{"dy", &LayerNormBwdParams::dy}, {"dsum", &LayerNormBwdParams::dsum}, {"sum", &LayerNormBwdParams::sum},
           {"gamma", &LayerNormBwdParams::gamma}, {"mean", &LayerNormBwdParams::mean},
           {"rstd", &LayerNormBwdParams::rstd}});
  pointer_properties<LayerNormBwdParams, LayerNormBwdParams, void*>(
      lb, {{"dx", &LayerNormBwdParams::dx}, {"dgamma", &LayerNormBwdParams::dgamma},
           {"dbeta", &LayerNormBwdParams::dbeta}, {"workspace", &LayerNormBwdParams::workspace}});
}

}  // namespace

void register_gpu(py::module_& m) {
  using namespace pybind11::literals;
  m.def("gpu_runtime_info", &runtime_info,
        "What the GPU runtime found: driver, NVRTC candidates and the one chosen, cache directory, and\n"
        "`ok`/`reason` (whether GPU kernels can run here).");
  m.def("gpu_variants", &variants, "Every kernel variant the GPU dispatchers can choose on sm_<arch>.", "arch"_a);
  m.attr("GPU_ARCHS") = py::tuple(py::cast(gpu::known_archs()));
  m.attr("GPU_HEAD_DIM_BUCKETS") = py::tuple(py::cast(gpu::attention_head_dim_buckets()));
  m.def("gpu_head_dim_bucket", &gpu::attention_head_dim_bucket,
        "The head-dim bucket whose variants serve max(head_dim, head_dim_v); 0 when above every bucket.",
        "head_dim"_a, "head_dim_v"_a = 0);
  m.def("gpu_attention_family",
        [](int arch, const std::string& dtype) {
          AttentionFamily f;
          check(gpu::resolve_attention_family(arch, dtype_named(dtype, "dtype"), AttentionFamily::kAuto, &f));
          return std::string(f == AttentionFamily::kTensorCore ? "tensor_core" : "simt");
        },
        "The attention family family='auto' picks for dtype on sm_<arch> (TF_FASTATTN_ATTENTION_FAMILY\n"
        "overrides it).",
        "arch"_a, "dtype"_a);
  m.def("gpu_compile", &compile,
        "Compiles one variant (by name, see gpu_variants) for sm_<arch> with NVRTC; needs no GPU.\n"
        "Returns the target, timing, cache use, NVRTC log and per-kernel registers/smem/spills.\n"
        "Raises RuntimeError with the NVRTC log when compilation fails.",
        "arch"_a, "name"_a, "use_cache"_a = true);
  // Launchers on the params structs above (pointer fields: ints, 0 = none)
  // and a CUstream (int; 0 = the legacy default stream), e.g. t.data_ptr() and
  // torch.cuda.current_stream().cuda_stream. Asynchronous on that stream.
  bind_params(m);
  m.def(
      "layer_norm_fwd_gpu",
      [](const LayerNormFwdParams& p, uintptr_t stream) { run([&] { return core::layer_norm_fwd(p, gpu_ctx(stream)); }); },
      "Fused residual-add + layer norm on the GPU over [rows, cols] (see layer_norm_fwd).", "params"_a,
      "stream"_a = 0);
  m.def(
      "layer_norm_bwd_gpu",
      [](const LayerNormBwdParams& p, uintptr_t stream) { run([&] { return core::layer_norm_bwd(p, gpu_ctx(stream)); }); },
      "Backward of layer_norm_fwd_gpu.", "params"_a, "stream"_a = 0);
  m.def("layer_norm_bwd_workspace_bytes_gpu",
        [](int64_t rows, int64_t cols, const std::string& dtype) {
          return layer_norm_bwd_workspace_bytes_gpu(rows, cols, dtype_named(dtype, "dtype"));
        },
        "rows"_a, "cols"_a, "dtype"_a);
  m.def(
      "attention_fwd_gpu",
      [](const AttentionFwdParams& p, uintptr_t stream, const std::string& family) {
        run([&] { return core::attention_fwd(p, gpu_ctx(stream, family)); });
      },
      "Attention forward on the GPU; family: auto, simt or tensor_core.", "params"_a, "stream"_a = 0,
      "family"_a = "auto");
  m.def(
      "attention_bwd_gpu",
      [](const AttentionBwdParams& p, uintptr_t stream, const std::string& family) {
        run([&] { return core::attention_bwd(p, gpu_ctx(stream, family)); });
      },
      "Attention backward on the GPU.", "params"_a, "stream"_a = 0, "family"_a = "auto");
  m.def("attention_bwd_workspace_bytes_gpu",
        [](const AttentionShape& shape, const std::string& dtype) {
          return attention_bwd_workspace_bytes_gpu(shape, dtype_named(dtype, "dtype"));
        },
        "shape"_a, "dtype"_a);
}

}  // namespace python
}  // namespace tf_fastattn
