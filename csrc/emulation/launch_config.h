// What the stand-in driver (emulator.cc) hands an emulated kernel's entry
// point: the launch shape and the scheduling options. Plain C++, included by
// the stand-in driver and by cuda_emulation.h.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tfa_emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

struct LaunchConfig {
  Dim3 grid, block;
  unsigned dynamic_smem = 0;  // bytes, as given to cuLaunchKernel
  int random_schedule = 1;    // 1: run the ready threads of a block in a seeded random order
  uint64_t seed = 0;          // that order's seed (the same seed gives the same order)
  int poison_smem = 1;        // 1: fill shared memory with 0xff bytes before each block
  int os_threads = 0;         // 1: the threads of a block are OS threads (for ThreadSanitizer), not fibers
};

// The entry point the stand-in NVRTC generates for every kernel NAME:
//   extern "C" int tfa_emu_entry_NAME(const LaunchConfig*, void** args, char* error, size_t error_size)
// runs the whole grid and returns 0, or non-zero with a message in `error`.
using EntryFn = int (*)(const LaunchConfig*, void**, char*, size_t);

}  // namespace tfa_emu
