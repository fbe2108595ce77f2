// Tensor-core helpers shared by the attention kernels for sm_80 and newer
// (mma.sync m16n8k16 with float32 accumulation). Include only from kernels
// compiled for sm_80+: the instructions do not exist on older GPUs.
// TFA_DTYPE selects the 16-bit type: 0 float16, otherwise bfloat16.
#pragma once

#include <cstdint>

namespace tfa {

// Each wrapper has a twin for the CPU emulation (csrc/emulation/cuda_emulation.h).
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(TFA_EMULATION)
  tfa_emu::mma16816(d, a, b0, b1, TFA_DTYPE != 0);
#elif TFA_DTYPE == 0
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two floats as one 16-bit pair, `lo` in the low half (the lower column).
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
#if defined(TFA_EMULATION)
  r = TFA_DTYPE == 0 ? tfa_emu::float_to_half(lo) | uint32_t(tfa_emu::float_to_half(hi)) << 16
                     : tfa_emu::float_to_bf16(lo) | uint32_t(tfa_emu::float_to_bf16(hi)) << 16;
#elif TFA_DTYPE == 0
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
  return r;
}

// A shared-memory address of 16-bit elements for ldmatrix and cp.async: the
// 32-bit shared-window address on the GPU (converted once, so constant
// offsets fold into the instructions' immediates), the host pointer in the
// emulation. smem_at(a, e) is the address e elements further.
#ifdef TFA_EMULATION
using SmemAddr = const uint16_t*;
__device__ __forceinline__ SmemAddr smem_addr(const uint16_t* p) { return p; }
__device__ __forceinline__ SmemAddr smem_at(SmemAddr a, int elements) { return a + elements; }
#else
using SmemAddr = uint32_t;
__device__ __forceinline__ SmemAddr smem_addr(const uint16_t* p) {
  uint32_t addr;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(addr) : "l"(p));
  return addr;
}
__device__ __forceinline__ SmemAddr smem_at(SmemAddr a, int elements) { return a + 2u * uint32_t(elements); }
#endif

// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: four 8 x 8 matrices of
// 16-bit values, transposed; lanes 8i .. 8i + 7 give the rows of matrix i
// (`row`: this lane's row, 16-byte aligned shared memory), r[i] receives this
// lane's fragment of matrix i.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* row) {
#ifdef TFA_EMULATION
  tfa_emu::ldmatrix_x4_trans(r, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row))
               : "memory");
#endif
}



// 2^x with ex2.approx.ftz (a result below the smallest normal float is 0; NaN
// and infinities as exp2): what FlashAttention-2's fast-math exp2f compiles
// to, without exp2f's rescaling around denormal results.
__device__ __forceinline__ float exp2_approx(float x) {
#ifdef TFA_EMULATION
  const float r = exp2f(x);
  return r < 1.17549435e-38f ? 0.f : r;  // NaN compares false: kept
#else
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#endif
}

// max(a, b), NaN if either is NaN (max.NaN.f32, sm_80 and newer).
__device__ __forceinline__ float fmax_nan(float a, float b) {
#ifdef TFA_EMULATION
  return (a != a || b != b) ? a + b : fmaxf(a, b);
#else
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#endif
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: four 8 x 8 matrices of 16-bit
// values; lanes 8i .. 8i + 7 give the rows of matrix i, r[i] receives this
// lane's fragment of matrix i (row lane / 4, columns 2 (lane % 4) and + 1):
// the A fragment of a row-major 16 x 16 tile, or the B fragments of two
// 8-column n-tiles stored n-major (K as [key][dim]).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], SmemAddr addr) {
#ifdef TFA_EMULATION
  tfa_emu::ldmatrix_x4(r, addr);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
#endif
}

// cp.async.cg.shared.global with zero fill: 16 bytes from `src` (16-byte
// aligned global memory) to `dst` (16-byte aligned shared memory), of which
// the first `src_bytes` (0 or 16) are read and the rest are zeros. The copy
// lands only by a cp_async_wait<N>() that covers its group (then a barrier
// makes it visible to the other threads).
__device__ __forceinline__ void cp_async16(SmemAddr dst, const uint16_t* src, int src_bytes) {
#ifdef TFA_EMULATION
  tfa_emu::cp_async16(const_cast<uint16_t*>(dst), src, src_bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
#endif
}

// Closes the group of this thread's cp.async copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef TFA_EMULATION
  tfa_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef TFA_EMULATION
  tfa_emu::cp_async_wait(kPending);
#else
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
#endif
}

__device__ __forceinline__ uint32_t ld32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

}  // namespace tfa
