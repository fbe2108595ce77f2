// Loaded kernel modules per CUDA context, and kernel launches on a stream.
#pragma once

#include <string>

#include "runtime/compiler.h"
#include "runtime/cuda_api.h"
#include "tf_fastattn/common.h"

namespace tf_fastattn {
namespace gpu {

// The device behind a stream's context.
struct DeviceInfo {
  CUcontext context = nullptr;
  int arch = 0;  // 10 * major + minor, e.g. 80
  int sm_count = 0;
  int max_smem_optin = 0;  // bytes of shared memory a block may opt in to
};

// Resolves the context of `stream` (a CUstream; null = the legacy default
// stream of the current context) and its device. Cached per context.
Status device_for_stream(void* stream, DeviceInfo* out);

// The kernel `function` of variant `v`, compiled for the device on first use
// (through the disk cache) and loaded into the device's context. When
// `dynamic_smem` exceeds the default 48 KiB, the function is opted in to it.
Status get_kernel(const DeviceInfo& dev, const KernelVariant& v, const char* function, int dynamic_smem,
                  CUfunction* out);

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// The largest grid x dimension of every architecture the kernels support
// (compute capability 3.0 and newer).
constexpr int64_t kMaxGridX = 2147483647;

// `blocks` as a 1-D grid, or InvalidArgument naming `kernel`, the count and
// what it is made of (`how`, e.g. "batch x heads x ceil(T / 64)") when it
// exceeds kMaxGridX.
Status grid_1d(int64_t blocks, const char* kernel, const char* how, Dim3* grid);

// Launches `f` on `stream` with its single by-value argument struct `args`.
Status launch(const DeviceInfo& dev, CUfunction f, Dim3 grid, Dim3 block, int dynamic_smem, void* stream,
              void* args);

// Zeroes `bytes` bytes at device address `ptr` on `stream`.
Status memset_zero(const DeviceInfo& dev, void* ptr, size_t bytes, void* stream);

}  // namespace gpu
}  // namespace tf_fastattn
