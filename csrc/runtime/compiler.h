// Run-time compilation of kernel variants with NVRTC, and the on-disk CUBIN
// cache.
//
// A variant is one .cu source compiled with a set of -D defines (dtype, head
// dim bucket, ...); it holds several kernels (extern "C" entry points). The
// cache key hashes the source and every header text, the options, the target
// architecture and the NVRTC version, so any change recompiles.
#pragma once

#include <string>
#include <vector>

#include "tf_fastattn/common.h"

namespace tf_fastattn {
namespace gpu {

struct KernelVariant {
  std::string source;                // e.g. "layer_norm.cu"
  std::vector<std::string> defines;  // e.g. {"TFA_DTYPE=0"}

  // "layer_norm.cu[TFA_DTYPE=0]": unique per variant, used as a map key.
  std::string name() const;
};

// Resources of one kernel, from ptxas' verbose log (-Xptxas -v). Dynamic
// shared memory is not in the log; launchers know it from the tile traits.
struct KernelResources {
  std::string function;
  int registers = 0;
  int static_smem_bytes = 0;
  int stack_bytes = 0;
  int spill_store_bytes = 0;
  int spill_load_bytes = 0;
};

struct CompiledVariant {
  std::string image;  // CUBIN, or PTX when `is_ptx`
  bool is_ptx = false;
  std::string target;  // "sm_80" or "compute_90"
  std::string log;     // NVRTC log including ptxas' resource lines
  std::string nvrtc_path;
  int nvrtc_version = 0;  // e.g. 12090
  bool from_cache = false;
  std::string cache_file;  // empty when the cache is off or not writable
  std::vector<KernelResources> resources;
};

// Compiles `v` for sm_<arch> (or PTX for the newest architecture NVRTC knows
// when the GPU is newer), through the disk cache unless `use_cache` is false.
// A failed compilation returns the NVRTC log in the Status message.
Status compile_variant(const KernelVariant& v, int arch, bool use_cache, CompiledVariant* out);

// The cache directory: $TF_FASTATTN_CACHE_DIR, else
// $XDG_CACHE_HOME/tf_fastattn/kernels, else ~/.cache/tf_fastattn/kernels.
std::string cache_dir();

// Parses ptxas' "-v" lines into per-kernel resources.
std::vector<KernelResources> parse_ptxas_log(const std::string& log);

}  // namespace gpu
}  // namespace tf_fastattn
