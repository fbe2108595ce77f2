// dlopen of libcuda.so.1 and libnvrtc.so.{12,13}; see cuda_api.h.
#include "runtime/cuda_api.h"

#include <dlfcn.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>

namespace tf_fastattn {
namespace gpu {
namespace {

bool file_exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

template <typename F>
bool sym(void* lib, const char* name, F* out, std::string* missing) {
  *out = reinterpret_cast<F>(::dlsym(lib, name));
  if (!*out) *missing += std::string(missing->empty() ? "" : ", ") + name;
  return *out != nullptr;
}

// The directory of the shared object this code is linked into (_C or the TF
// op library, both installed in site-packages/tf_fastattn).
std::string own_dir() {
  Dl_info info;
  if (::dladdr(reinterpret_cast<void*>(&own_dir), &info) == 0 || !info.dli_fname) return "";
  std::string p = info.dli_fname;
  const size_t slash = p.rfind('/');
  return slash == std::string::npos ? "." : p.substr(0, slash);
}

struct DriverState {
  std::once_flag once;
  Status status;
  Driver driver;
};
DriverState& driver_state() {
  static DriverState s;
  return s;
}

void load_driver(DriverState* s) {
  // $TF_FASTATTN_CUDA_DRIVER: another driver library (the CPU emulator of
  // csrc/emulation in tests).
  const std::string path = env("TF_FASTATTN_CUDA_DRIVER").empty() ? "libcuda.so.1" : env("TF_FASTATTN_CUDA_DRIVER");
  void* lib = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    const std::string named = env("TF_FASTATTN_CUDA_DRIVER").empty() ? path : path + ", from TF_FASTATTN_CUDA_DRIVER";
    s->status = Status::Unavailable("the CUDA driver (" + named + ") could not be loaded: " + ::dlerror() +
                                "; GPU kernels need an NVIDIA driver (the CPU kernels work without one)");
    return;
  }
  Driver& d = s->driver;
  std::string missing;
  sym(lib, "cuInit", &d.cuInit, &missing);
  sym(lib, "cuDriverGetVersion", &d.cuDriverGetVersion, &missing);
  sym(lib, "cuGetErrorString", &d.cuGetErrorString, &missing);
  sym(lib, "cuDeviceGetAttribute", &d.cuDeviceGetAttribute, &missing);
  sym(lib, "cuCtxGetCurrent", &d.cuCtxGetCurrent, &missing);
  sym(lib, "cuCtxPushCurrent_v2", &d.cuCtxPushCurrent, &missing);
  sym(lib, "cuCtxPopCurrent_v2", &d.cuCtxPopCurrent, &missing);
  sym(lib, "cuCtxGetDevice", &d.cuCtxGetDevice, &missing);
  sym(lib, "cuStreamGetCtx", &d.cuStreamGetCtx, &missing);
  sym(lib, "cuModuleLoadData", &d.cuModuleLoadData, &missing);
  sym(lib, "cuModuleGetFunction", &d.cuModuleGetFunction, &missing);
  sym(lib, "cuFuncSetAttribute", &d.cuFuncSetAttribute, &missing);
  sym(lib, "cuLaunchKernel", &d.cuLaunchKernel, &missing);
  sym(lib, "cuMemsetD8Async", &d.cuMemsetD8Async, &missing);
  if (!missing.empty()) {
    s->status = Status::Unavailable(path + " lacks " + missing + " (driver too old for CUDA 12?)");
    return;
  }
  const CUresult r = d.cuInit(0);
  if (r != 0) {
    s->status = driver_error(d, r, "cuInit");
    return;
  }
  d.cuDriverGetVersion(&d.version);
  d.path = path;
}

std::vector<std::string> search_dirs() {
  std::vector<std::string> dirs;
  const std::string own = own_dir();
  if (!own.empty()) {
    dirs.push_back(own + "/../nvidia/cuda_nvrtc/lib");  // nvidia-cuda-nvrtc-cu12
    dirs.push_back(own + "/../nvidia/cu13/lib");        // CUDA 13 wheels
  }
  for (const char* var : {"CUDA_HOME", "CUDA_PATH"}) {
    const std::string root = env(var);
    if (!root.empty()) {
      dirs.push_back(root + "/lib64");
      dirs.push_back(root + "/lib");
    }
  }
  dirs.push_back("/usr/local/cuda/lib64");
  dirs.push_back("/usr/local/cuda/lib");
  return dirs;
}

std::vector<std::string> sonames() {
  // The NVRTC of the driver's major version first: its CUBINs are what that
  // driver loads most surely.
  const Driver* d = nullptr;
  const bool cuda13 = driver(&d).ok() && d->version >= 13000;
  if (cuda13) return {"libnvrtc.so.13", "libnvrtc.so.12"};
  return {"libnvrtc.so.12", "libnvrtc.so.13"};
}

struct NvrtcState {
  std::mutex mu;
  std::map<std::string, std::unique_ptr<Nvrtc>> loaded;  // by path; null = failed
  std::map<std::string, std::string> errors;
};
NvrtcState& nvrtc_state() {
  static NvrtcState s;
  return s;
}

const Nvrtc* load_nvrtc(NvrtcState* s, const std::string& path) {
  auto it = s->loaded.find(path);
  if (it != s->loaded.end()) return it->second.get();
  std::unique_ptr<Nvrtc> n;
  void* lib = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    s->errors[path] = ::dlerror();
  } else {
    n.reset(new Nvrtc());
    std::string missing;
    sym(lib, "nvrtcVersion", &n->nvrtcVersion, &missing);
    sym(lib, "nvrtcGetNumSupportedArchs", &n->nvrtcGetNumSupportedArchs, &missing);
    sym(lib, "nvrtcGetSupportedArchs", &n->nvrtcGetSupportedArchs, &missing);
    sym(lib, "nvrtcGetErrorString", &n->nvrtcGetErrorString, &missing);
    sym(lib, "nvrtcCreateProgram", &n->nvrtcCreateProgram, &missing);
    sym(lib, "nvrtcDestroyProgram", &n->nvrtcDestroyProgram, &missing);
    sym(lib, "nvrtcCompileProgram", &n->nvrtcCompileProgram, &missing);
    sym(lib, "nvrtcGetProgramLogSize", &n->nvrtcGetProgramLogSize, &missing);
    sym(lib, "nvrtcGetProgramLog", &n->nvrtcGetProgramLog, &missing);
    sym(lib, "nvrtcGetCUBINSize", &n->nvrtcGetCUBINSize, &missing);
    sym(lib, "nvrtcGetCUBIN", &n->nvrtcGetCUBIN, &missing);
    sym(lib, "nvrtcGetPTXSize", &n->nvrtcGetPTXSize, &missing);
    sym(lib, "nvrtcGetPTX", &n->nvrtcGetPTX, &missing);
    if (!missing.empty()) {
      s->errors[path] = "lacks " + missing;
      n.reset();
    } else {
      n->nvrtcVersion(&n->major, &n->minor);
      int count = 0;
      n->nvrtcGetNumSupportedArchs(&count);
      n->archs.resize(count);
      if (count) n->nvrtcGetSupportedArchs(n->archs.data());
      n->path = path;
    }
  }
  const Nvrtc* raw = n.get();
  s->loaded[path] = std::move(n);
  return raw;
}

}  // namespace

bool Nvrtc::supports(int arch) const { return std::find(archs.begin(), archs.end(), arch) != archs.end(); }

Status driver(const Driver** out) {
  DriverState& s = driver_state();
  std::call_once(s.once, load_driver, &s);
  if (!s.status.ok()) return s.status;
  *out = &s.driver;
  return Status::OK();
}

Status driver_error(const Driver& d, CUresult r, const char* what) {
  const char* msg = nullptr;
  if (d.cuGetErrorString) d.cuGetErrorString(r, &msg);
  return Status::Internal(std::string(what) + " failed with CUDA error " + std::to_string(r) +
                         (msg ? std::string(" (") + msg + ")" : std::string()));
}

std::vector<std::string> nvrtc_candidates() {
  std::vector<std::string> out;
  const std::string explicit_path = env("TF_FASTATTN_NVRTC");
  if (!explicit_path.empty()) out.push_back(explicit_path);
  const std::vector<std::string> names = sonames();
  for (const std::string& dir : search_dirs()) {
    for (const std::string& name : names) {
      if (file_exists(dir + "/" + name)) out.push_back(dir + "/" + name);
    }
  }
  for (const std::string& name : names) out.push_back(name);  // the loader's own search path
  return out;
}

Status nvrtc_for_arch(int arch, const Nvrtc** out) {
  NvrtcState& s = nvrtc_state();
  std::lock_guard<std::mutex> lock(s.mu);
  // A library named by TF_FASTATTN_NVRTC that does not load is an error, not
  // a silent fall back to another NVRTC.
  const std::string explicit_path = env("TF_FASTATTN_NVRTC");
  if (!explicit_path.empty() && load_nvrtc(&s, explicit_path) == nullptr) {
    return Status::Unavailable("TF_FASTATTN_NVRTC=" + explicit_path + " cannot be used as NVRTC: " +
                               s.errors[explicit_path] + " (set it to a libnvrtc.so.12 or .13, or unset it to "
                               "search next to the CUDA wheels, CUDA_HOME and the system)");
  }
  const Nvrtc* newest = nullptr;
  for (const std::string& path : nvrtc_candidates()) {
    const Nvrtc* n = load_nvrtc(&s, path);
    if (!n) continue;
    if (n->supports(arch)) {
      *out = n;
      return Status::OK();
    }
    if (!newest || n->version() > newest->version()) newest = n;
  }
  if (newest && !newest->archs.empty() && arch > newest->archs.back()) {
    *out = newest;  // a GPU newer than NVRTC knows: compile PTX, the driver JITs it
    return Status::OK();
  }
  std::string tried;
  for (const auto& e : s.errors) tried += "\n  " + e.first + ": " + e.second;
  if (newest) {
    return Status::Unavailable("no NVRTC found can compile for sm_" + std::to_string(arch) + " (newest found: " +
                               newest->path + ", version " + std::to_string(newest->major) + "." +
                               std::to_string(newest->minor) + "; CUDA 13 dropped sm_60 and sm_70: install "
                               "nvidia-cuda-nvrtc-cu12)");
  }
  return Status::Unavailable(
      "NVRTC (libnvrtc.so.12 or .13) was not found; GPU kernels are compiled at run time and need it: "
      "pip install nvidia-cuda-nvrtc-cu12 (or tensorflow[and-cuda]), or set TF_FASTATTN_NVRTC to the library "
      "path. Tried:" + tried);
}

}  // namespace gpu
}  // namespace tf_fastattn
