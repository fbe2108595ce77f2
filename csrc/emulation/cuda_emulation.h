// Host meanings for what the CUDA kernels of csrc/kernels/cuda use, so the
// same sources compile with g++ and run on the CPU (the stand-in NVRTC of
// emulator.cc force-includes this header with -include).
//
// Execution model: the blocks of a grid run one after another; the threads of
// a block are fibers (user-mode stacks switched by a few instructions) that
// run until they reach a barrier (__syncthreads*) or a warp collective
// (shuffle, mma.sync, ldmatrix), in a seeded random order. A barrier releases
// when every live thread of the block has arrived (exited threads count as
// arrived, as on Volta and newer); a warp collective when all 32 lanes have,
// and the collective's result is computed for all lanes at once from the
// operands they posted, following the fragment layouts of NVIDIA's PTX ISA.
// A thread that can never proceed (a barrier some threads skip, a shuffle
// with an exited lane, barriers of different kinds) fails the launch with a
// message naming where every thread waits.
//
// A second mode (LaunchConfig::os_threads) runs the threads of a block as OS
// threads synchronised by a mutex and a condition variable, for
// ThreadSanitizer: kernels compiled with -fsanitize=thread then have every
// pair of shared-memory accesses not ordered by a barrier reported as a race.
//
// Shared memory: __shared__ variables become statics in a dedicated section
// and the dynamic shared memory one buffer of exactly the launch's size; both
// are filled with 0xff bytes (NaN in every float type) before each block, so
// a read of shared memory no thread of the block wrote shows up as NaN.
//
// What this cannot show: the GPU memory model beyond barriers, timing,
// occupancy, register pressure, and the exact rounding of the tensor cores'
// accumulation (emulated as a float64 dot product rounded once).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#include <condition_variable>
#include <cstdio>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <string>
#include <vector>

#include "launch_config.h"

#define TFA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
#define __shared__ static __attribute__((section("tfa_emu_shared"), aligned(16)))

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};

// The section's bounds (the linker defines them for a section named like an
// identifier); weak so a kernel without static shared memory links too.
extern "C" char __start_tfa_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_tfa_emu_shared[] __attribute__((weak, visibility("hidden")));

namespace tfa_emu {

template <typename To, typename From>
inline To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of one size");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

// ---- fibers ----------------------------------------------------------------
// switch_context(save, load): saves the callee-saved registers and the stack
// pointer into *save, loads them from `load` and returns on that stack.
extern "C" void tfa_emu_switch_context(void** save, void* load);
__asm__(R"(
  .text
  .p2align 4
  .type tfa_emu_switch_context, @function
  .hidden tfa_emu_switch_context
tfa_emu_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size tfa_emu_switch_context, .-tfa_emu_switch_context
)");

enum class State { kReady, kBarrier, kWarp, kDone };
enum class WarpOp { kNone, kShuffleXor, kMma16816, kLdmatrixX4Trans, kLdmatrixX4 };
enum class BarrierOp { kSync, kOr, kAnd, kCount };

struct Thread {
  void* sp = nullptr;
  Dim3 idx;
  unsigned linear = 0;
  State state = State::kReady;
  // Barrier operand and result.
  BarrierOp barrier = BarrierOp::kSync;
  int predicate = 0, result = 0;
  // Warp collective: operation, its scalar arguments and operands, and the
  // result computed for this lane.
  WarpOp op = WarpOp::kNone;
  unsigned mask = 0;
  int arg0 = 0, arg1 = 0;
  uint32_t in[10] = {};
  const void* addr = nullptr;
  uint32_t out[4] = {};
  // cp.async: the copies issued since the last commit, and the committed
  // groups still in flight (oldest first). A copy's source bytes are read at
  // issue (global memory does not change during a launch); its destination
  // is written only when a wait covers its group.
  struct AsyncCopy {
    void* dst;
    unsigned char bytes[16];
    bool eager;  // may land before its wait (else only at the wait)
  };
  std::vector<AsyncCopy> open_copies;
  std::vector<std::vector<AsyncCopy>> copy_groups;
};

constexpr size_t kStackBytes = 256 * 1024;

struct Block {
  Dim3 grid, dim, idx;
  std::vector<Thread> threads;
  std::vector<char*> stacks;  // kStackBytes each, a guard page below
  std::vector<unsigned> ready;
  std::vector<unsigned> warp_waiting;
  unsigned at_barrier = 0, done = 0;
  void* scheduler_sp = nullptr;
  std::mt19937_64 rng;
  bool random = true;
  std::string error;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::vector<unsigned char> dynamic_smem;
  bool poison = true;
  // OS-thread mode: every thread of the block is an OS thread; the fields
  // above are guarded by `mu`, a waiting thread sleeps on its own condition.
  bool os_threads = false;
  std::mutex mu;
  std::unique_ptr<std::condition_variable[]> wake;
  size_t wake_size = 0;
};

inline Block* g_block = nullptr;  // launches are serialised by the stand-in driver
inline thread_local Thread* tl_self = nullptr;  // the running GPU thread (set by the scheduler for fibers)

inline Thread* self() { return tl_self; }

// Thrown in OS-thread mode to end a thread's kernel after a failure.
struct Abort {};

[[noreturn]] inline void fiber_main();

inline void fail(const std::string& what) {
  Block& b = *g_block;
  if (b.error.empty()) {
    char where[96];
    std::snprintf(where, sizeof(where), "block (%u, %u, %u) thread %u: ", b.idx.x, b.idx.y, b.idx.z,
                  tl_self ? tl_self->linear : 0u);
    b.error = where + what;
    if (b.os_threads) {
      for (size_t i = 0; i < b.threads.size(); ++i) b.wake[i].notify_one();
    }
  }
}

// Back to the scheduler; returns when this thread runs again.
inline void yield_to_scheduler() {
  Thread* t = self();
  tfa_emu_switch_context(&t->sp, g_block->scheduler_sp);
}

inline void make_ready(Thread& t) {
  t.state = State::kReady;
  if (g_block->os_threads) {
    g_block->wake[t.linear].notify_one();
  } else {
    g_block->ready.push_back(t.linear);
  }
}

// A barrier releases when every thread not exited has arrived.
inline void maybe_release_barrier() {
  Block& b = *g_block;
  const unsigned n = static_cast<unsigned>(b.threads.size());
  if (b.at_barrier == 0 || b.at_barrier + b.done != n) return;
  BarrierOp op = BarrierOp::kSync;
  bool first = true;
  int any = 0, all = 1, count = 0;
  for (Thread& t : b.threads) {
    if (t.state != State::kBarrier) continue;
    if (first) op = t.barrier, first = false;
    if (t.barrier != op) {
      fail("threads wait at different kinds of barrier (__syncthreads and __syncthreads_or/and/count)");
      return;
    }
    any |= t.predicate != 0;
    all &= t.predicate != 0;
    count += t.predicate != 0;
  }
  const int result = op == BarrierOp::kOr ? any : op == BarrierOp::kAnd ? all : count;
  b.at_barrier = 0;
  for (Thread& t : b.threads) {
    if (t.state != State::kBarrier) continue;
    t.result = result;
    make_ready(t);
  }
}

inline std::string describe_deadlock(const Block& b);

// OS-thread mode, under the lock: fails the block when every thread not
// exited waits and none can be released (fibers see it as an empty ready list).
inline void check_deadlock(Block& b) {
  for (const Thread& t : b.threads) {
    if (t.state == State::kReady) return;
  }
  if (b.done < b.threads.size()) fail(describe_deadlock(b));
}

// Waits until this thread is released (its state back to kReady): a switch to
// the scheduler for fibers, a sleep on the block's condition for OS threads.
inline void wait_released(Thread* t, std::unique_lock<std::mutex>& lock) {
  Block& b = *g_block;
  if (!b.os_threads) {
    yield_to_scheduler();
    return;
  }
  check_deadlock(b);
  b.wake[t->linear].wait(lock, [&] { return t->state == State::kReady || !b.error.empty(); });
  if (!b.error.empty()) throw Abort();
}

inline std::unique_lock<std::mutex> lock_block() {
  return g_block->os_threads ? std::unique_lock<std::mutex>(g_block->mu) : std::unique_lock<std::mutex>();
}

// cp.async copies in flight land at any moment up to the wait that covers
// them: half of them (drawn at issue) only at the wait, so a read before the
// wait sees stale bytes; the other half each with probability 1/2 whenever
// its thread reaches a barrier or a warp collective, so a copy into a buffer
// other warps may still be reading, issued without a barrier in between,
// overwrites it under some schedules, as on the GPU.
inline void land_some_copies(Thread* t) {
  if (t->open_copies.empty() && t->copy_groups.empty()) return;
  std::unique_lock<std::mutex> lock = lock_block();  // the block's random stream
  const auto land = [](std::vector<Thread::AsyncCopy>& copies) {
    std::vector<Thread::AsyncCopy> keep;
    for (const Thread::AsyncCopy& c : copies) {
      if (c.eager && (g_block->rng() & 1)) {
        memcpy(c.dst, c.bytes, 16);
      } else {
        keep.push_back(c);
      }
    }
    copies.swap(keep);
  };
  land(t->open_copies);
  for (std::vector<Thread::AsyncCopy>& group : t->copy_groups) land(group);
}

inline int barrier(BarrierOp op, int predicate) {
  Thread* t = self();
  land_some_copies(t);
  std::unique_lock<std::mutex> lock = lock_block();
  t->state = State::kBarrier;
  t->barrier = op;
  t->predicate = predicate;
  ++g_block->at_barrier;
  maybe_release_barrier();
  wait_released(t, lock);
  return t->result;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    bits = bit_cast<uint32_t>(ldexpf(static_cast<float>(man), -24)) | sign;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  return bit_cast<float>(bits);
}

// Round to nearest even, as cvt.rn.f16.f32.
inline uint16_t float_to_half(float f) {
  const uint32_t x = bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return 0x7fff;                   // NaN (canonical, as the PTX cvt)
  if (ax >= 0x477ff000u) return sign | 0x7c00u;          // rounds to infinity
  if (ax < 0x38800000u) {                                // half subnormal (or zero)
    const float a = fabsf(f) * 16777216.0f;              // exact: a power of two
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(nearbyintf(a)));
  }
  const uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u) - 0x38000000u;
  return static_cast<uint16_t>(sign | (r >> 13));
}

// Round to nearest even, as cvt.rn.bf16.f32.
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_to_float(uint16_t h) { return bit_cast<float>(static_cast<uint32_t>(h) << 16); }

inline float unpack(uint32_t pair, int hi, bool bf16) {
  const uint16_t h = static_cast<uint16_t>(hi ? pair >> 16 : pair & 0xffffu);
  return bf16 ? bf16_to_float(h) : half_to_float(h);
}

inline bool in_shared(const void* p, size_t bytes) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  const std::vector<unsigned char>& d = g_block->dynamic_smem;
  if (!d.empty() && c >= d.data() && c + bytes <= d.data() + d.size()) return true;
  return __start_tfa_emu_shared && c >= reinterpret_cast<unsigned char*>(__start_tfa_emu_shared) &&
         c + bytes <= reinterpret_cast<unsigned char*>(__stop_tfa_emu_shared);
}

// The warp's collective, computed for all 32 lanes from their operands.
inline void complete_warp_op(Thread* lanes) {
  const WarpOp op = lanes[0].op;
  for (int l = 1; l < 32; ++l) {
    if (lanes[l].op != op || lanes[l].arg0 != lanes[0].arg0 || lanes[l].arg1 != lanes[0].arg1) {
      fail("the lanes of a warp reached different warp collectives (or one with different arguments)");
      return;
    }
    if (lanes[l].mask != 0xffffffffu) {
      fail("a warp collective with a member mask other than 0xffffffff");
      return;
    }
  }
  switch (op) {
    case WarpOp::kShuffleXor: {
      const int lane_mask = lanes[0].arg0, width = lanes[0].arg1;
      for (int l = 0; l < 32; ++l) {
        int src = l ^ lane_mask;
        if (src >= (l / width + 1) * width) src = l;
        lanes[l].out[0] = lanes[src].in[0];
        lanes[l].out[1] = lanes[src].in[1];
      }
      break;
    }
    case WarpOp::kMma16816: {
      // mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: group g = lane / 4,
      // c = lane % 4. A (16 x 16): a0 (g, 2c..2c+1), a1 (g + 8, 2c..), a2 (g,
      // 2c + 8..), a3 (g + 8, 2c + 8..). B (16 x 8, k x n): b0 (k 2c..2c+1, n g),
      // b1 (k 2c + 8.., n g). C, D (16 x 8): d0, d1 (g, 2c..2c+1), d2, d3 (g + 8, 2c..).
      const bool bf16 = lanes[0].arg0 != 0;
      float A[16][16], B[16][8], C[16][8];
      for (int l = 0; l < 32; ++l) {
        const int g = l / 4, c = l % 4;
        const uint32_t* in = lanes[l].in;
        for (int e = 0; e < 2; ++e) {
          A[g][2 * c + e] = unpack(in[0], e, bf16);
          A[g + 8][2 * c + e] = unpack(in[1], e, bf16);
          A[g][2 * c + 8 + e] = unpack(in[2], e, bf16);
          A[g + 8][2 * c + 8 + e] = unpack(in[3], e, bf16);
          B[2 * c + e][g] = unpack(in[4], e, bf16);
          B[2 * c + 8 + e][g] = unpack(in[5], e, bf16);
          memcpy(&C[g][2 * c + e], &in[6 + e], 4);
          memcpy(&C[g + 8][2 * c + e], &in[8 + e], 4);
        }
      }
      for (int l = 0; l < 32; ++l) {
        const int g = l / 4, c = l % 4;
        for (int i = 0; i < 4; ++i) {
          const int row = g + 8 * (i / 2), col = 2 * c + i % 2;
          double acc = C[row][col];
          for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[row][k]) * B[k][col];
          const float d = static_cast<float>(acc);
          memcpy(&lanes[l].out[i], &d, 4);
        }
      }
      break;
    }
    case WarpOp::kLdmatrixX4Trans:
    case WarpOp::kLdmatrixX4: {
      // ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i .. 8i + 7
      // give the row addresses of matrix i. Lane l receives in r[i] the
      // elements (row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1) of matrix
      // i; transposed, (row 2 (l % 4), column l / 4) and (row 2 (l % 4) + 1,
      // column l / 4). The first in the low half.
      for (int l = 0; l < 32; ++l) {
        const void* p = lanes[l].addr;
        if (!in_shared(p, 16) || reinterpret_cast<uintptr_t>(p) % 16 != 0) {
          char msg[128];
          std::snprintf(msg, sizeof(msg), "ldmatrix: lane %d's row address is not a 16-byte aligned shared-memory row",
                        l);
          fail(msg);
          return;
        }
      }
      const auto row = [&](int lane) { return static_cast<const uint16_t*>(lanes[lane].addr); };
      for (int l = 0; l < 32; ++l) {
        for (int i = 0; i < 4; ++i) {
          uint16_t lo, hi;
          if (op == WarpOp::kLdmatrixX4Trans) {
            lo = row(8 * i + 2 * (l % 4))[l / 4];
            hi = row(8 * i + 2 * (l % 4) + 1)[l / 4];
          } else {
            lo = row(8 * i + l / 4)[2 * (l % 4)];
            hi = row(8 * i + l / 4)[2 * (l % 4) + 1];
          }
          lanes[l].out[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
        }
      }
      break;
    }
    case WarpOp::kNone:
      break;
  }
  for (int l = 0; l < 32; ++l) make_ready(lanes[l]);
}

// Posts this lane's operands (already in self()->in/addr) and waits for the
// warp; returns with self()->out filled.
inline void warp_collective(WarpOp op, unsigned mask, int arg0, int arg1) {
  Thread* t = self();
  land_some_copies(t);
  Block& b = *g_block;
  std::unique_lock<std::mutex> lock = lock_block();
  t->op = op;
  t->mask = mask;
  t->arg0 = arg0;
  t->arg1 = arg1;
  t->state = State::kWarp;
  const unsigned warp = t->linear / 32;
  if ((warp + 1) * 32 > b.threads.size()) {
    fail("a warp collective in a partial warp (the block is not a multiple of 32 threads)");
  } else if (++b.warp_waiting[warp] == 32) {
    b.warp_waiting[warp] = 0;
    complete_warp_op(&b.threads[warp * 32]);
  }
  wait_released(t, lock);
}

template <typename T>
inline T shfl_xor(unsigned mask, T v, int lane_mask, int width) {
  static_assert(sizeof(T) <= 8, "shuffles move up to 8 bytes");
  Thread* t = self();
  memset(t->in, 0, 8);
  memcpy(t->in, &v, sizeof(T));
  warp_collective(WarpOp::kShuffleXor, mask, lane_mask, width);
  T r;
  memcpy(&r, t->out, sizeof(T));
  return r;
}

inline void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  Thread* t = self();
  for (int i = 0; i < 4; ++i) t->in[i] = a[i];
  t->in[4] = b0;
  t->in[5] = b1;
  memcpy(&t->in[6], d, 16);
  warp_collective(WarpOp::kMma16816, 0xffffffffu, bf16 ? 1 : 0, 0);
  memcpy(d, t->out, 16);
}

inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  Thread* t = self();
  t->addr = row;
  warp_collective(WarpOp::kLdmatrixX4Trans, 0xffffffffu, 0, 0);
  for (int i = 0; i < 4; ++i) r[i] = t->out[i];
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  Thread* t = self();
  t->addr = row;
  warp_collective(WarpOp::kLdmatrixX4, 0xffffffffu, 0, 0);
  for (int i = 0; i < 4; ++i) r[i] = t->out[i];
}

// cp.async (16 bytes, zero fill past src_bytes): queued in this thread's open
// group; lands at a cp_async_wait that covers the group.
inline void cp_async16(void* dst, const void* src, int src_bytes) {
  if (!in_shared(dst, 16) || reinterpret_cast<uintptr_t>(dst) % 16 != 0) {
    return fail("cp.async: the destination is not 16-byte aligned shared memory");  // nothing queued to land there
  }
  if (src_bytes != 0 && src_bytes != 16) return fail("cp.async: src_bytes must be 0 or 16 here");
  if (src_bytes && reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    return fail("cp.async: the source is not 16-byte aligned");
  }
  Thread::AsyncCopy c{dst, {}, false};
  if (src_bytes) memcpy(c.bytes, src, 16);
  {
    std::unique_lock<std::mutex> lock = lock_block();
    c.eager = g_block->rng() & 1;
  }
  self()->open_copies.push_back(c);
}

inline void cp_async_commit() {
  Thread* t = self();
  t->copy_groups.push_back(std::move(t->open_copies));
  t->open_copies.clear();
}

// Completes every committed group but the newest `pending`, the copies in a
// random order (a kernel that reads a destination before its wait reads the
// stale or poisoned bytes).
inline void cp_async_wait(int pending) {
  Thread* t = self();
  std::vector<Thread::AsyncCopy> landing;
  while (static_cast<int>(t->copy_groups.size()) > pending) {
    for (const Thread::AsyncCopy& c : t->copy_groups.front()) landing.push_back(c);
    t->copy_groups.erase(t->copy_groups.begin());
  }
  {
    std::unique_lock<std::mutex> lock = lock_block();
    for (size_t i = landing.size(); i > 1; --i) std::swap(landing[i - 1], landing[g_block->rng() % i]);
  }
  for (const Thread::AsyncCopy& c : landing) memcpy(c.dst, c.bytes, 16);
}

inline void* dynamic_smem() { return g_block->dynamic_smem.data(); }

// ---- scheduler ---------------------------------------------------------------

[[noreturn]] inline void fiber_main() {
  g_block->body(g_block->body_arg);
  Thread* t = self();
  t->state = State::kDone;
  ++g_block->done;
  maybe_release_barrier();
  yield_to_scheduler();
  __builtin_trap();  // a finished thread is never scheduled again
}

inline void start_fiber(Thread& t, char* stack_top) {
  // The layout tfa_emu_switch_context pops: r15, r14, r13, r12, rbx, rbp, then
  // the return address (fiber_main) with the stack aligned as after a call.
  void** sp = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(stack_top) & ~uintptr_t(15)) - 8;
  for (int i = 0; i < 6; ++i) sp[i] = nullptr;
  sp[6] = reinterpret_cast<void*>(&fiber_main);
  sp[7] = nullptr;
  t.sp = sp;
}

inline std::string describe_deadlock(const Block& b) {
  unsigned at_barrier = 0, at_warp = 0, done = 0;
  std::string warps;
  for (const Thread& t : b.threads) {
    at_barrier += t.state == State::kBarrier;
    at_warp += t.state == State::kWarp;
    done += t.state == State::kDone;
  }
  for (size_t w = 0; w * 32 < b.threads.size(); ++w) {
    if (b.warp_waiting[w]) warps += " warp " + std::to_string(w) + ": " + std::to_string(b.warp_waiting[w]) + "/32;";
  }
  return "deadlock: " + std::to_string(at_barrier) + " threads wait at a barrier, " + std::to_string(at_warp) +
         " at a warp collective," + warps + " " + std::to_string(done) + " exited (a barrier or a warp collective not "
         "reached by every thread that must reach it)";
}

// OS-thread mode: the body of one GPU thread.
inline void thread_main(Thread* t) {
  Block& b = *g_block;
  tl_self = t;
  try {
    b.body(b.body_arg);
  } catch (const Abort&) {
  }
  std::lock_guard<std::mutex> lock(b.mu);
  t->state = State::kDone;
  ++b.done;
  maybe_release_barrier();
  check_deadlock(b);
}

// Runs every thread of the current block to its end; false with b.error set
// on a deadlock or a failed check.
inline bool run_block(Block& b) {
  const unsigned n = static_cast<unsigned>(b.threads.size());
  b.ready.clear();
  b.at_barrier = b.done = 0;
  std::fill(b.warp_waiting.begin(), b.warp_waiting.end(), 0u);
  if (b.poison) {
    std::fill(b.dynamic_smem.begin(), b.dynamic_smem.end(), 0xff);
    if (__start_tfa_emu_shared) memset(__start_tfa_emu_shared, 0xff, __stop_tfa_emu_shared - __start_tfa_emu_shared);
  }
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    t = Thread();
    t.linear = i;
    t.idx = Dim3{i % b.dim.x, (i / b.dim.x) % b.dim.y, i / (b.dim.x * b.dim.y)};
    if (!b.os_threads) {
      start_fiber(t, b.stacks[i] + kStackBytes);
      b.ready.push_back(i);
    }
  }
  if (b.os_threads) {
    std::vector<std::thread> os;
    os.reserve(n);
    for (unsigned i = 0; i < n; ++i) os.emplace_back(thread_main, &b.threads[i]);
    for (std::thread& t : os) t.join();
    return b.error.empty();
  }
  while (b.error.empty()) {
    if (b.ready.empty()) {
      if (b.done == n) return true;
      tl_self = nullptr;
      fail(describe_deadlock(b));
      break;
    }
    size_t pick = b.ready.size() - 1;
    if (b.random) pick = static_cast<size_t>(b.rng() % b.ready.size());
    const unsigned id = b.ready[pick];
    b.ready[pick] = b.ready.back();
    b.ready.pop_back();
    tl_self = &b.threads[id];
    tfa_emu_switch_context(&b.scheduler_sp, tl_self->sp);
  }
  return false;
}

inline char* map_stack() {
  const size_t page = 4096;
  void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  mprotect(p, page, PROT_NONE);  // guard page: an overflow faults instead of corrupting
  return static_cast<char*>(p) + page;
}

template <typename P>
struct KernelCall {
  void (*kernel)(P);
  P params;
  static void run(void* self) {
    KernelCall* c = static_cast<KernelCall*>(self);
    c->kernel(c->params);
  }
};

// Runs `kernel` over the whole grid of `cfg` with the argument args[0].
template <typename P>
int run_grid(void (*kernel)(P), const LaunchConfig* cfg, void** args, char* error, size_t error_size) {
  static Block block;  // kept between launches: stacks are mapped once
  Block& b = block;
  g_block = &b;
  KernelCall<P> call{kernel, *static_cast<const P*>(args[0])};
  b.body = &KernelCall<P>::run;
  b.body_arg = &call;
  b.grid = cfg->grid;
  b.dim = cfg->block;
  b.random = cfg->random_schedule != 0;
  b.rng.seed(cfg->seed);
  b.poison = cfg->poison_smem != 0;
  b.os_threads = cfg->os_threads != 0;
  b.error.clear();
  b.dynamic_smem.assign(cfg->dynamic_smem, 0);
  const unsigned n = b.dim.x * b.dim.y * b.dim.z;
  b.threads.assign(n, Thread());
  b.warp_waiting.assign((n + 31) / 32, 0u);
  if (b.os_threads && b.wake_size < n) {
    b.wake.reset(new std::condition_variable[n]);
    b.wake_size = n;
  }
  while (!b.os_threads && b.stacks.size() < n) {
    char* s = map_stack();
    if (!s) {
      std::snprintf(error, error_size, "cannot map a %zu-byte stack per emulated thread", kStackBytes);
      return 1;
    }
    b.stacks.push_back(s);
  }
  for (unsigned z = 0; z < b.grid.z; ++z) {
    for (unsigned y = 0; y < b.grid.y; ++y) {
      for (unsigned x = 0; x < b.grid.x; ++x) {
        b.idx = Dim3{x, y, z};
        if (!run_block(b)) {
          std::snprintf(error, error_size, "%s", b.error.c_str());
          return 1;
        }
      }
    }
  }
  return 0;
}

}  // namespace tfa_emu

// ---- the CUDA names -----------------------------------------------------------
#define threadIdx (::tfa_emu::self()->idx)
#define blockIdx (::tfa_emu::g_block->idx)
#define blockDim (::tfa_emu::g_block->dim)
#define gridDim (::tfa_emu::g_block->grid)

inline void __syncthreads() { ::tfa_emu::barrier(::tfa_emu::BarrierOp::kSync, 0); }
inline int __syncthreads_or(int p) { return ::tfa_emu::barrier(::tfa_emu::BarrierOp::kOr, p); }
inline int __syncthreads_and(int p) { return ::tfa_emu::barrier(::tfa_emu::BarrierOp::kAnd, p); }
inline int __syncthreads_count(int p) { return ::tfa_emu::barrier(::tfa_emu::BarrierOp::kCount, p); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::tfa_emu::shfl_xor(mask, v, lane_mask, width);
}

inline float __int_as_float(int i) { return ::tfa_emu::bit_cast<float>(i); }
inline float __uint_as_float(unsigned u) { return ::tfa_emu::bit_cast<float>(u); }
inline unsigned __float_as_uint(float f) { return ::tfa_emu::bit_cast<unsigned>(f); }
inline int __float_as_int(float f) { return ::tfa_emu::bit_cast<int>(f); }

// The generated entry point of kernel NAME (see launch_config.h).
#define TFA_EMU_ENTRY(NAME)                                                                              \
  extern "C" __attribute__((visibility("default"))) int tfa_emu_entry_##NAME(                          \
      const ::tfa_emu::LaunchConfig* cfg, void** args, char* error, size_t error_size) {                 \
    return ::tfa_emu::run_grid(&NAME, cfg, args, error, error_size);                                      \
  }
