// Tile shapes of the tensor-core attention backward (attention_mma_bwd.cu),
// shared by the kernels and the host launcher (csrc/runtime/attention_gpu.cc)
// so grids and dynamic shared-memory sizes come from the same constants.
//
// Status: compiled with NVRTC 12 in CI, NOT yet run on a GPU.
#pragma once

namespace tfa {

// 4 warps per block for every backward kernel.
constexpr int kMmaBwdWarps = 4;
constexpr int kMmaBwdThreads = 32 * kMmaBwdWarps;
// delta = rowsum(dO * O): one warp per (b, t, n) row.
constexpr int kMmaBwdDeltaRows = kMmaBwdWarps;

// dQ blocks: 64 query rows (16 per warp) of one (b, n); Q and dO stay in
// shared memory, K and V tiles of mma_bwd_dq_keys keys stream through.
constexpr int kMmaBwdDqRows = 16 * kMmaBwdWarps;
constexpr int mma_bwd_dq_keys(int head_dim) { return head_dim <= 64 ? 64 : (head_dim <= 128 ? 32 : 16); }
// Q, dO [64][H + 8] and K, V [keys][H + 8], 16-bit (+8: conflict-free
// fragment loads and 16-byte-aligned ldmatrix rows).
constexpr int mma_bwd_dq_smem_bytes(int head_dim) {
  return 2 * (2 * kMmaBwdDqRows + 2 * mma_bwd_dq_keys(head_dim)) * (head_dim + 8);
}

// dK/dV blocks: 64 keys (16 per warp) of one (b, kv head); K and V stay in
// shared memory, Q and dO tiles of mma_bwd_kv_rows query rows of every query
// head of the group stream through. Head dim 256 keeps fewer rows per step to
// stay under the 99 KiB sm_86/sm_89 allow per block.
constexpr int kMmaBwdKvKeys = 16 * kMmaBwdWarps;
constexpr int mma_bwd_kv_rows(int head_dim) { return head_dim <= 128 ? 32 : 16; }
// K, V [64][H + 8] and Q, dO [rows][H + 8] 16-bit, then lse and delta [rows] float32.
constexpr int mma_bwd_kv_smem_bytes(int head_dim) {
  return 2 * (2 * kMmaBwdKvKeys + 2 * mma_bwd_kv_rows(head_dim)) * (head_dim + 8) + 2 * 4 * mma_bwd_kv_rows(head_dim);
}

}  // namespace tfa
