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
// kMmaWarps warps per block; in the forward each warp owns mma_fwd_slabs(H)
// slabs of 16 query rows (two up to head dim 128, so every K and V fragment
// feeds two MMAs; one at 256, where the 128 output accumulators per slab fill
// the registers), and keys come in tiles of mma_key_tile(H). Shared memory
// holds Q [rows][Hp + 8], K [keys][Hp + 8] and V [keys][Hp + 8] as 16-bit
// values, filled by 16-byte cp.async copies (K of the next tile in flight
// during the softmax, V of the next tile during the next Q K^T); the +8
// (16 bytes) row padding puts the 8 rows of every ldmatrix in distinct banks.
// Q's region stages the output for 16-byte stores. Head dim 128 needs 68 KiB,
// 256 66 KiB: dynamic shared memory with an opt-in (sm_80: 163 KiB, sm_86/89:
// 99 KiB, sm_90: 227 KiB).
constexpr int kMmaWarps = 4;
constexpr int kMmaRowTile = 16 * kMmaWarps;  // query rows per block of one slab per warp (the backward's unit)
constexpr int mma_fwd_slabs(int head_dim) { return head_dim <= 32 ? 2 : 1; }
constexpr int mma_fwd_rows(int head_dim) { return kMmaRowTile * mma_fwd_slabs(head_dim); }
constexpr int mma_key_tile(int head_dim) { return head_dim <= 128 ? 64 : 32; }
constexpr int mma_fwd_smem_bytes(int head_dim) {
  return 2 * (mma_fwd_rows(head_dim) + 2 * mma_key_tile(head_dim)) * (head_dim + 8);
}

}  // namespace tfa
