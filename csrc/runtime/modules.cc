// Per-context module table and launches; see modules.h.
#include "runtime/modules.h"

#include <map>
#include <mutex>
#include <utility>

namespace tf_fastattn {
namespace gpu {
namespace {

// Makes `ctx` current for the scope when it is not already (TensorFlow and
// PyTorch normally have it current on their launching threads).
class ScopedContext {
 public:
  ScopedContext(const Driver& d, CUcontext ctx) : d_(d) {
    CUcontext cur = nullptr;
    d_.cuCtxGetCurrent(&cur);
    if (cur != ctx) pushed_ = d_.cuCtxPushCurrent(ctx) == 0;
  }
  ~ScopedContext() {
    if (pushed_) {
      CUcontext popped;
      d_.cuCtxPopCurrent(&popped);
    }
  }

 private:
  const Driver& d_;
  bool pushed_ = false;
};

struct Table {
  std::mutex mu;
  std::map<CUcontext, DeviceInfo> devices;
  std::map<std::pair<CUcontext, std::string>, CUmodule> modules;  // by variant name
  std::map<std::pair<CUmodule, std::string>, std::pair<CUfunction, int>> functions;  // + opted-in smem
};
Table& table() {
  static Table t;
  return t;
}

}  // namespace

Status device_for_stream(void* stream, DeviceInfo* out) {
  const Driver* d = nullptr;
  TFA_RETURN_IF_ERROR(driver(&d));
  CUcontext ctx = nullptr;
  CUresult r = d->cuStreamGetCtx(static_cast<CUstream>(stream), &ctx);
  if (r != 0 || !ctx) {
    if (r != 0) return driver_error(*d, r, "cuStreamGetCtx");
    return Status::Unavailable("no current CUDA context for the default stream: initialise the device first");
  }
  Table& t = table();
  std::lock_guard<std::mutex> lock(t.mu);
  auto it = t.devices.find(ctx);
  if (it != t.devices.end()) {
    *out = it->second;
    return Status::OK();
  }
  ScopedContext scope(*d, ctx);
  CUdevice dev = 0;
  if ((r = d->cuCtxGetDevice(&dev)) != 0) return driver_error(*d, r, "cuCtxGetDevice");
  int major = 0, minor = 0;
  DeviceInfo info;
  info.context = ctx;
  d->cuDeviceGetAttribute(&major, kAttrComputeCapabilityMajor, dev);
  d->cuDeviceGetAttribute(&minor, kAttrComputeCapabilityMinor, dev);
  d->cuDeviceGetAttribute(&info.sm_count, kAttrMultiprocessorCount, dev);
  d->cuDeviceGetAttribute(&info.max_smem_optin, kAttrMaxSharedMemoryPerBlockOptin, dev);
  info.arch = 10 * major + minor;
  if (info.arch < 60) {
    return Status::Unavailable("tf_fastattn GPU kernels need compute capability 6.0 or newer, the device has " +
                           std::to_string(major) + "." + std::to_string(minor));
  }
  t.devices[ctx] = info;
  *out = info;
  return Status::OK();
}

Status get_kernel(const DeviceInfo& dev, const KernelVariant& v, const char* function, int dynamic_smem,
                  CUfunction* out) {
  const Driver* d = nullptr;
  TFA_RETURN_IF_ERROR(driver(&d));
  Table& t = table();
  // One lock for lookups and first-use compilation: a variant compiles once
  // per process even when several threads ask for it together.
  std::lock_guard<std::mutex> lock(t.mu);
  const auto mkey = std::make_pair(dev.context, v.name());
  auto mit = t.modules.find(mkey);
  if (mit == t.modules.end()) {
    CompiledVariant c;
    TFA_RETURN_IF_ERROR(compile_variant(v, dev.arch, /*use_cache=*/true, &c));
    ScopedContext scope(*d, dev.context);
    CUmodule mod = nullptr;
    const CUresult r = d->cuModuleLoadData(&mod, c.image.c_str());
    if (r != 0) return driver_error(*d, r, ("cuModuleLoadData(" + v.name() + ", " + c.target + ")").c_str());
    mit = t.modules.emplace(mkey, mod).first;
  }
  const auto fkey = std::make_pair(mit->second, std::string(function));
  auto fit = t.functions.find(fkey);
  if (fit == t.functions.end()) {
    CUfunction f = nullptr;
    const CUresult r = d->cuModuleGetFunction(&f, mit->second, function);
    if (r != 0) return driver_error(*d, r, (std::string("cuModuleGetFunction(") + function + ")").c_str());
    fit = t.functions.emplace(fkey, std::make_pair(f, 48 * 1024)).first;
  }
  if (dynamic_smem > fit->second.second) {
    if (dynamic_smem > dev.max_smem_optin) {
      return Status::Internal(std::string(function) + " needs " + std::to_string(dynamic_smem) +
                             " bytes of shared memory, the device allows " + std::to_string(dev.max_smem_optin));
    }
    ScopedContext scope(*d, dev.context);
    const CUresult r = d->cuFuncSetAttribute(fit->second.first, kFuncAttrMaxDynamicSharedSizeBytes, dynamic_smem);
    if (r != 0) return driver_error(*d, r, "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)");
    fit->second.second = dynamic_smem;
  }
  *out = fit->second.first;
  return Status::OK();
}

Status grid_1d(int64_t blocks, const char* kernel, const char* how, Dim3* grid) {
  if (blocks > kMaxGridX) {
    return Status::Invalid(std::string(kernel) + ": " + std::to_string(blocks) + " thread blocks (" + how +
                           ") exceed the GPU's grid limit of " + std::to_string(kMaxGridX) +
                           "; split the call (e.g. over the batch)");
  }
  *grid = Dim3{static_cast<unsigned>(blocks)};
  return Status::OK();
}

Status launch(const DeviceInfo& dev, CUfunction f, Dim3 grid, Dim3 block, int dynamic_smem, void* stream,
              void* args) {
  const Driver* d = nullptr;
  TFA_RETURN_IF_ERROR(driver(&d));
  ScopedContext scope(*d, dev.context);
  void* params[] = {args};
  const CUresult r = d->cuLaunchKernel(f, grid.x, grid.y, grid.z, block.x, block.y, block.z,
                                       static_cast<unsigned>(dynamic_smem), static_cast<CUstream>(stream), params,
                                       nullptr);
  return r == 0 ? Status::OK() : driver_error(*d, r, "cuLaunchKernel");
}

Status memset_zero(const DeviceInfo& dev, void* ptr, size_t bytes, void* stream) {
  if (bytes == 0) return Status::OK();
  const Driver* d = nullptr;
  TFA_RETURN_IF_ERROR(driver(&d));
  ScopedContext scope(*d, dev.context);
  const CUresult r =
      d->cuMemsetD8Async(reinterpret_cast<CUdeviceptr>(ptr), 0, bytes, static_cast<CUstream>(stream));
  return r == 0 ? Status::OK() : driver_error(*d, r, "cuMemsetD8Async");
}

}  // namespace gpu
}  // namespace tf_fastattn

namespace tf_fastattn {

Status gpu_runtime_status() {
  const gpu::Driver* d = nullptr;
  TFA_RETURN_IF_ERROR(gpu::driver(&d));
  const gpu::Nvrtc* nv = nullptr;
  return gpu::nvrtc_for_arch(75, &nv);  // sm_75: known to NVRTC 12 and 13
}

}  // namespace tf_fastattn
