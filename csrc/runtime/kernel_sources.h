// The CUDA sources of csrc/kernels/cuda (and tf_fastattn/philox.h), embedded
// into the library at build time (CMakeLists.txt generates kernel_sources.cc),
// so NVRTC compiles exactly the files that ship.
#pragma once

#include <cstddef>

namespace tf_fastattn {
namespace gpu {

struct EmbeddedSource {
  const char* name;  // the #include name: "common.cuh", "tf_fastattn/philox.h", ...
  const char* text;
};

// All embedded files; `count` receives their number.
const EmbeddedSource* embedded_sources(size_t* count);

}  // namespace gpu
}  // namespace tf_fastattn
