// Kernel arguments and tile shapes of the attention CUDA kernels, shared by
// the host launcher (csrc/runtime/attention_gpu.cc) and the device code
// (attention_simt.cu, attention_mma.cu, attention_mma_bwd.cu), so grids and
// shared-memory sizes are computed from the same constants the kernels use.
#pragma once

#include <cstdint>

#include "tf_fastattn/attention_params.h"

namespace tfa {

// The kernels take the host's params structs (tf_fastattn/attention_params.h)
// by value, finalize()d: one definition of every field for host and device.
using tf_fastattn::AttentionBwdParams;
using tf_fastattn::AttentionFwdParams;
using tf_fastattn::AttentionParams;

// ---- SIMT family (float32 arithmetic, sm_60 and newer) ---------------------
// 128 threads. Every tile fits the 48 KiB of static shared memory P100 allows
// per block. The head dim is processed in chunks of up to 64 columns so
// K and V tiles stay small for head dim 256.
constexpr int kSimtThreads = 128;
constexpr int kSimtRowTile = 32;  // query rows per forward block (16 row groups x 2)
constexpr int kSimtKeyTile = 32;  // keys per step: 8 lanes x 4 consecutive keys (one Philox draw)
constexpr int simt_chunk(int head_dim) { return head_dim < 64 ? head_dim : 64; }
// dQ blocks keep Q and dO tiles: 16 rows for head dim 256 to stay under 48 KiB.
constexpr int simt_dq_rows(int head_dim) { return head_dim == 256 ? 16 : 32; }
// dK/dV blocks keep K and V tiles and 2 x (keys x head_dim / 128) accumulators
// per thread: 32 values for every head dim.
constexpr int simt_dkdv_keys(int head_dim) {
  return 2048 / head_dim > 32 ? 32 : (2048 / head_dim < 8 ? 8 : 2048 / head_dim);
}

// ---- Tensor-core family (mma.sync m16n8k16, sm_80 and newer) ---------------
// One warp owns 16 query rows; kMmaWarps warps per block. Per key tile of
// mma_key_tile(head_dim) keys, shared memory holds Q [64][Hp + 8], K [BN][Hp + 8]
// and V transposed, Vt [Hp][BN + 8], as 16-bit values: the +8 (16 bytes) row
// padding makes the 32-bit fragment loads of a warp (8 rows x 4 columns)
// land in distinct banks, and Vt makes V's B fragments contiguous pairs.
// Head dim 256 needs 71 KiB: dynamic shared memory with an opt-in (sm_80:
// 163 KiB, sm_86/89: 99 KiB, sm_90: 227 KiB).
constexpr int kMmaWarps = 4;
constexpr int kMmaRowTile = 16 * kMmaWarps;
constexpr int mma_key_tile(int head_dim) { return head_dim <= 64 ? 64 : 32; }
constexpr int mma_fwd_smem_bytes(int head_dim) {
  return 2 * ((kMmaRowTile + mma_key_tile(head_dim)) * (head_dim + 8) + head_dim * (mma_key_tile(head_dim) + 8));
}

}  // namespace tfa
