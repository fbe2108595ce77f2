// The CUDA driver API and NVRTC, loaded with dlopen at first use.
//
// Nothing links against CUDA: the package builds with g++ alone and imports
// on machines without a GPU. Only the handful of entry points the runtime
// uses are declared here, with the driver's ABI types.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "tf_fastattn/common.h"

namespace tf_fastattn {
namespace gpu {

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;
using CUcontext = struct CUctx_st*;
using CUmodule = struct CUmod_st*;
using CUfunction = struct CUfunc_st*;
using CUstream = struct CUstream_st*;

// Driver enum values used here (cuda.h).
constexpr int kAttrMultiprocessorCount = 16;
constexpr int kAttrComputeCapabilityMajor = 75;
constexpr int kAttrComputeCapabilityMinor = 76;
constexpr int kAttrMaxSharedMemoryPerBlockOptin = 97;
constexpr int kFuncAttrMaxDynamicSharedSizeBytes = 8;

struct Driver {
  CUresult (*cuInit)(unsigned);
  CUresult (*cuDriverGetVersion)(int*);
  CUresult (*cuGetErrorString)(CUresult, const char**);
  CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice);
  CUresult (*cuCtxGetCurrent)(CUcontext*);
  CUresult (*cuCtxPushCurrent)(CUcontext);
  CUresult (*cuCtxPopCurrent)(CUcontext*);
  CUresult (*cuCtxGetDevice)(CUdevice*);
  CUresult (*cuStreamGetCtx)(CUstream, CUcontext*);
  CUresult (*cuModuleLoadData)(CUmodule*, const void*);
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*);
  CUresult (*cuFuncSetAttribute)(CUfunction, int, int);
  CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                             CUstream, void**, void**);
  CUresult (*cuMemsetD8Async)(CUdeviceptr, unsigned char, size_t, CUstream);
  int version = 0;  // cuDriverGetVersion, e.g. 12080
  std::string path;
};

using nvrtcProgram = struct _nvrtcProgram*;

struct Nvrtc {
  int (*nvrtcVersion)(int*, int*);
  int (*nvrtcGetNumSupportedArchs)(int*);
  int (*nvrtcGetSupportedArchs)(int*);
  const char* (*nvrtcGetErrorString)(int);
  int (*nvrtcCreateProgram)(nvrtcProgram*, const char*, const char*, int, const char* const*, const char* const*);
  int (*nvrtcDestroyProgram)(nvrtcProgram*);
  int (*nvrtcCompileProgram)(nvrtcProgram, int, const char* const*);
  int (*nvrtcGetProgramLogSize)(nvrtcProgram, size_t*);
  int (*nvrtcGetProgramLog)(nvrtcProgram, char*);
  int (*nvrtcGetCUBINSize)(nvrtcProgram, size_t*);
  int (*nvrtcGetCUBIN)(nvrtcProgram, char*);
  int (*nvrtcGetPTXSize)(nvrtcProgram, size_t*);
  int (*nvrtcGetPTX)(nvrtcProgram, char*);
  int major = 0, minor = 0;
  std::vector<int> archs;  // e.g. {50, 52, ..., 90, 100, 120}
  std::string path;

  bool supports(int arch) const;
  int version() const { return major * 1000 + minor * 10; }
};

// The driver, loaded once (libcuda.so.1). Fails with a message saying what is
// missing; the CPU kernels keep working either way.
Status driver(const Driver** out);

// An NVRTC that can compile for `arch` (e.g. 80), or, for an architecture no
// installed NVRTC knows, the newest one (the caller then compiles PTX for the
// newest architecture it supports and lets the driver JIT it).
//
// Search order: $TF_FASTATTN_NVRTC (a library path); the pip wheels next to
// the package (site-packages/nvidia/cuda_nvrtc/lib for CUDA 12,
// site-packages/nvidia/cu13/lib for CUDA 13); $CUDA_HOME, $CUDA_PATH and
// /usr/local/cuda (lib64, lib); then the dynamic loader's path. In each place
// the NVRTC matching the driver's major version is tried first, then 12 and 13.
Status nvrtc_for_arch(int arch, const Nvrtc** out);

// Every NVRTC library the search finds (paths), for diagnostics.
std::vector<std::string> nvrtc_candidates();

// "cuLaunchKernel failed: CUDA_ERROR_... (message)".
Status driver_error(const Driver& d, CUresult r, const char* what);

}  // namespace gpu
}  // namespace tf_fastattn
