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

const void* cptr(uintptr_t p) { return reinterpret_cast<const void*>(p); }
void* mptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

core::ExecContext gpu_ctx(uintptr_t stream, const std::string& family = "auto") {
  core::ExecContext e;
  e.backend = core::Backend::kGpu;
  e.gpu.stream = mptr(stream);
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

AttentionShape attention_shape(const std::vector<int64_t>& s) {
  if (s.size() != 7) {
    throw py::value_error("shape must be (B, T, S, N, Nkv, H, Hv), got " + std::to_string(s.size()) + " values");
  }
  // The core's checks, as the tensor front ends (core/attention_checks.h).
  AttentionShape a;
  check(core::attention_shape(core::Dims{s[0], s[1], s[3], s[5]}, core::Dims{s[0], s[2], s[4], s[5]},
                              core::Dims{s[0], s[2], s[4], s[6]}, &a));
  return a;
}

MaskStrides mask_strides(const std::vector<int64_t>& s) {
  if (s.size() != 4) throw py::value_error("mask_strides must be 4 element strides (b, n, t, s)");
  return MaskStrides{s[0], s[1], s[2], s[3]};
}

void layer_norm_fwd(uintptr_t x, uintptr_t residual, uintptr_t gamma, uintptr_t beta, uintptr_t y, uintptr_t sum,
                    uintptr_t mean, uintptr_t rstd, int64_t rows, int64_t cols, const std::string& dtype,
                    const std::string& param_dtype, double epsilon, uintptr_t stream) {
  LayerNormFwdParams p;
  p.dtype = dtype_named(dtype, "dtype");
  p.param_dtype = dtype_named(param_dtype, "param_dtype");
  p.rows = rows;
  p.cols = cols;
  p.x = cptr(x);
  p.residual = cptr(residual);
  p.gamma = cptr(gamma);
  p.beta = cptr(beta);
  p.y = mptr(y);
  p.sum = mptr(sum);
  p.mean = mptr(mean);
  p.rstd = mptr(rstd);
  p.epsilon = epsilon;
  run([&] { return core::layer_norm_fwd(p, gpu_ctx(stream)); });
}

void layer_norm_bwd(uintptr_t dy, uintptr_t dsum, uintptr_t sum, uintptr_t gamma, uintptr_t mean, uintptr_t rstd,
                    uintptr_t dx, uintptr_t dgamma, uintptr_t dbeta, uintptr_t workspace, int64_t rows, int64_t cols,
                    const std::string& dtype, const std::string& param_dtype, uintptr_t stream) {
  LayerNormBwdParams p;
  p.dtype = dtype_named(dtype, "dtype");
  p.param_dtype = dtype_named(param_dtype, "param_dtype");
  p.rows = rows;
  p.cols = cols;
  p.dy = cptr(dy);
  p.dsum = cptr(dsum);
  p.sum = cptr(sum);
  p.gamma = cptr(gamma);
  p.mean = cptr(mean);
  p.rstd = cptr(rstd);
  p.dx = mptr(dx);
  p.dgamma = mptr(dgamma);
  p.dbeta = mptr(dbeta);
  p.workspace = mptr(workspace);
  run([&] { return core::layer_norm_bwd(p, gpu_ctx(stream)); });
}

void attention_fwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t mask, const std::vector<int64_t>& strides,
                   uintptr_t o, uintptr_t lse, const std::vector<int64_t>& shape, const std::string& dtype,
                   double scale, bool is_causal, double dropout_rate, uint64_t seed, uintptr_t stream,
                   const std::string& family) {
  AttentionFwdParams p;
  p.dtype = dtype_named(dtype, "dtype");
  p.shape = attention_shape(shape);
  p.q = cptr(q);
  p.k = cptr(k);
  p.v = cptr(v);
  p.mask = static_cast<const bool*>(cptr(mask));
  p.mask_strides = mask_strides(strides);
  p.o = mptr(o);
  p.lse = mptr(lse);
  p.scale = scale;
  p.is_causal = is_causal;
  p.dropout_rate = dropout_rate;
  p.seed = seed;
  run([&] { return core::attention_fwd(p, gpu_ctx(stream, family)); });
}

void attention_bwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t mask, const std::vector<int64_t>& strides,
                   uintptr_t o, uintptr_t lse, uintptr_t d_o, uintptr_t dq, uintptr_t dk, uintptr_t dv,
                   uintptr_t workspace, const std::vector<int64_t>& shape, const std::string& dtype, double scale,
                   bool is_causal, double dropout_rate, uint64_t seed, uintptr_t stream, const std::string& family) {
  AttentionBwdParams p;
  p.dtype = dtype_named(dtype, "dtype");
  p.shape = attention_shape(shape);
  p.q = cptr(q);
  p.k = cptr(k);
  p.v = cptr(v);
  p.mask = static_cast<const bool*>(cptr(mask));
  p.mask_strides = mask_strides(strides);
  p.o = cptr(o);
  p.lse = cptr(lse);
  p.do_ = cptr(d_o);
  p.dq = mptr(dq);
  p.dk = mptr(dk);
  p.dv = mptr(dv);
  p.workspace = mptr(workspace);
  p.scale = scale;
  p.is_causal = is_causal;
  p.dropout_rate = dropout_rate;
  p.seed = seed;
  run([&] { return core::attention_bwd(p, gpu_ctx(stream, family)); });
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
  // Launchers on raw device pointers (ints, 0 = none) and a CUstream (int; 0 =
  // the legacy default stream), e.g. t.data_ptr() and
  // torch.cuda.current_stream().cuda_stream. Asynchronous on that stream.
  m.def("layer_norm_fwd_gpu", &layer_norm_fwd,
        "Fused residual-add + layer norm on the GPU over [rows, cols] (see layer_norm_fwd).",
        "x"_a, "residual"_a, "gamma"_a, "beta"_a, "y"_a, "sum"_a, "mean"_a, "rstd"_a, "rows"_a, "cols"_a,
        "dtype"_a, "param_dtype"_a, "epsilon"_a, "stream"_a = 0);
  m.def("layer_norm_bwd_gpu", &layer_norm_bwd,
        "Backward of layer_norm_fwd_gpu; workspace: layer_norm_bwd_workspace_bytes_gpu bytes.",
        "dy"_a, "dsum"_a, "sum"_a, "gamma"_a, "mean"_a, "rstd"_a, "dx"_a, "dgamma"_a, "dbeta"_a, "workspace"_a,
        "rows"_a, "cols"_a, "dtype"_a, "param_dtype"_a, "stream"_a = 0);
  m.def("layer_norm_bwd_workspace_bytes_gpu",
        [](int64_t rows, int64_t cols, const std::string& dtype) {
          return layer_norm_bwd_workspace_bytes_gpu(rows, cols, dtype_named(dtype, "dtype"));
        },
        "rows"_a, "cols"_a, "dtype"_a);
  m.def("attention_fwd_gpu", &attention_fwd,
        "Attention forward on the GPU. shape = (B, T, S, N, Nkv, H, Hv); mask_strides = element strides\n"
        "(b, n, t, s) of a bool mask (0 broadcasts); lse is float32 [B, N, T]. family: auto, simt or\n"
        "tensor_core.",
        "q"_a, "k"_a, "v"_a, "mask"_a, "mask_strides"_a, "o"_a, "lse"_a, "shape"_a, "dtype"_a, "scale"_a,
        "is_causal"_a = false, "dropout_rate"_a = 0.0, "seed"_a = 0, "stream"_a = 0, "family"_a = "auto");
  m.def("attention_bwd_gpu", &attention_bwd,
        "Attention backward on the GPU; workspace: attention_bwd_workspace_bytes_gpu bytes.",
        "q"_a, "k"_a, "v"_a, "mask"_a, "mask_strides"_a, "o"_a, "lse"_a, "d_o"_a, "dq"_a, "dk"_a, "dv"_a,
        "workspace"_a, "shape"_a, "dtype"_a, "scale"_a, "is_causal"_a = false, "dropout_rate"_a = 0.0,
        "seed"_a = 0, "stream"_a = 0, "family"_a = "auto");
  m.def("attention_bwd_workspace_bytes_gpu",
        [](const std::vector<int64_t>& shape, const std::string& dtype) {
          return attention_bwd_workspace_bytes_gpu(attention_shape(shape), dtype_named(dtype, "dtype"));
        },
        "shape"_a, "dtype"_a);
}

}  // namespace python
}  // namespace tf_fastattn
