// CPU FlashAttention-2 forward and backward (see tf_fastattn/attention.h).
//
// Work is tiled into kBr query rows x kBc keys. Tiles of q, k, v, dO are
// converted to the accumulation type (float32, or float64 for float64 inputs)
// in small per-chunk buffers, so the inner products run on contiguous float
// rows whatever the input dtype, and memory stays independent of T x S;
// inputs already in that type whose rows are whole 16-lane vectors are read
// where they are (in_place).
//
// All tile products are one shape of GEMM, C[M][N] (+)= A[M][K] * B[K][N] with
// row-major A, B and C, which is why some tiles are also kept transposed
// (K^T for Q K^T, V^T for dO V^T, Q^T and dO^T for the key-major backward
// pass). The micro-kernels (that GEMM, row max, exp) are the only code that
// differs between the portable and the AVX-512 tier; everything else (masks,
// dropout, online softmax, the chain rule) is shared.
//
// Determinism: each output element is produced by exactly one work item, in an
// order fixed by the tiling alone, so results do not depend on how
// parallel_for splits the range.
#include "tf_fastattn/attention.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/cpu/attention_microkernels.h"
#include "kernels/cpu/cpu_types.h"
#include "tf_fastattn/philox.h"

namespace tf_fastattn {

namespace {

using cpu::bfloat16_t;
using cpu::half_t;
using cpu::MicroKernels;

// 64 x 64 tiles: with H = 64 one float tile is 16 KiB, so the Q, K^T, V, S
// and O tiles of the forward stay in L1/L2, and 64 is a multiple of the
// micro-kernel's 16-lane vectors and of Philox's 4 keys per call.
constexpr int64_t kBr = 64;
constexpr int64_t kBc = 64;
// Row lengths of the N operand of every GEMM are padded to this many lanes.
constexpr int64_t kPad = 16;
// Most elements of the forward's per-thread K^T and V cache (S = 2048 and
// H = Hv = 64 take 256 Ki: 1 MiB of float32 per thread).
constexpr int64_t kKvCacheElems = int64_t(1) << 21;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// ---------------------------------------------------------------------------
// Scratch buffers. The work chunks' buffers (per thread about 1-4 MiB for
// whole-sequence backward items) are allocated on every call; glibc serves
// blocks that large from fresh mmap'ed pages and returns them on free, so
// every call faulted its scratch in again: about 5% of a small problem's time
// (B 1, N 4, T 512, H 64, forward + backward, one thread). Freed blocks now
// stay with their thread for its next call, up to kScratchKeepBytes a thread
// (the chunks allocate and free on the same thread). Contents are not reused:
// the buffers are initialised as before.

constexpr size_t kScratchKeepBytes = size_t(16) << 20;
constexpr size_t kScratchKeepBlocks = 32;

class ScratchCache {
 public:
  ScratchCache() { blocks_.reserve(kScratchKeepBlocks); }
  ~ScratchCache() {
    for (const Block& b : blocks_) std::free(b.raw);
  }
  // A kept block of at least `bytes` (the smallest, and not over 4x as
  // large), or a new one. Each block starts with a header holding its size.
  void* take(size_t bytes) {
    size_t best = blocks_.size();
    for (size_t i = 0; i < blocks_.size(); ++i) {
      if (blocks_[i].bytes >= bytes && blocks_[i].bytes <= 4 * bytes + 4096 &&
          (best == blocks_.size() || blocks_[i].bytes < blocks_[best].bytes))
        best = i;
    }
    char* raw;
    if (best < blocks_.size()) {
      raw = static_cast<char*>(blocks_[best].raw);
      kept_ -= blocks_[best].bytes;
      blocks_[best] = blocks_.back();
      blocks_.pop_back();
    } else {
      raw = bytes > test_limit() ? nullptr : static_cast<char*>(std::malloc(bytes + kHeader));
      if (raw == nullptr) throw std::bad_alloc();
      *reinterpret_cast<size_t*>(raw) = bytes;
    }
    return raw + kHeader;
  }
  void give(void* p) {
    char* raw = static_cast<char*>(p) - kHeader;
    const size_t bytes = *reinterpret_cast<size_t*>(raw);
    if (kept_ + bytes <= kScratchKeepBytes && blocks_.size() < kScratchKeepBlocks) {
      blocks_.push_back(Block{raw, bytes});
      kept_ += bytes;
    } else {
      std::free(raw);
    }
  }
  // TF_FASTATTN_TEST_SCRATCH_LIMIT (bytes): a test hook that makes any
  // larger scratch block fail as malloc would out of memory, so the tests can
  // reach the out-of-memory path (tests/test_out_of_memory.py). Unset: none.
  static size_t test_limit() {
    static const size_t limit = [] {
      const char* env = std::getenv("TF_FASTATTN_TEST_SCRATCH_LIMIT");
      return env && *env ? static_cast<size_t>(std::strtoull(env, nullptr, 10)) : ~size_t(0);
    }();
    return limit;
  }
  static ScratchCache& local() {
    thread_local ScratchCache cache;
    return cache;
  }

 private:
  static constexpr size_t kHeader = 16;  // keeps malloc's 16-byte alignment
  struct Block {
    void* raw;
    size_t bytes;  // usable bytes after the header
  };
  std::vector<Block> blocks_;
  size_t kept_ = 0;
};

template <typename T>
struct ScratchAllocator {
  using value_type = T;
  ScratchAllocator() = default;
  template <typename U>
  ScratchAllocator(const ScratchAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(ScratchCache::local().take(std::max<size_t>(n, 1) * sizeof(T))); }
  void deallocate(T* p, size_t) { ScratchCache::local().give(p); }
  template <typename U>
  bool operator==(const ScratchAllocator<U>&) const {
    return true;
  }
  template <typename U>
  bool operator!=(const ScratchAllocator<U>&) const {
    return false;
  }
};
template <typename T>
using Scratch = std::vector<T, ScratchAllocator<T>>;

// ---------------------------------------------------------------------------
// Tile loads: element type T -> accumulation type Acc.

template <typename T, typename Acc>
inline Acc load(const T& x) {
  return static_cast<Acc>(cpu::to_float(x));
}

// The vectorised float32 tile copies (cpu::CopyKernels), or null.
inline const cpu::CopyKernels* f32_copies() {
  static const cpu::CopyKernels* k = cpu::copy_kernels();
  return k;
}

// dst[r * ld + c] = scale * src[r * stride + c] for r < rows, c < cols, in
// Acc and stored as D: the tiles' way in (S an input type, D = Acc) and out
// (S = Acc, D an output type).
template <typename S, typename D, typename Acc>
void copy_tile(const S* src, int64_t stride, int64_t rows, int64_t cols, Acc scale, D* dst, int64_t ld) {
  if constexpr (std::is_same_v<S, float> && std::is_same_v<D, float>) {
    if (const cpu::CopyKernels* ck = f32_copies()) return ck->rows(src, stride, rows, cols, scale, dst, ld);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const S* s = src + r * stride;
    D* d = dst + r * ld;
    for (int64_t c = 0; c < cols; ++c) d[c] = cpu::from_acc<D>(scale * load<S, Acc>(s[c]));
  }
}

// The transposed tile: dst[c * ld + r] = scale * src[r * stride + c] (also
// of tiles already converted to Acc).
template <typename T, typename Acc>
void load_tile_t(const T* src, int64_t stride, int64_t rows, int64_t cols, Acc scale, Acc* dst, int64_t ld) {
  if constexpr (std::is_same_v<T, float> && std::is_same_v<Acc, float>) {
    if (const cpu::CopyKernels* ck = f32_copies()) return ck->transposed(src, stride, rows, cols, scale, dst, ld);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * stride;
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = scale * load<T, Acc>(s[c]);
  }
}

// Inputs already in the accumulation type (float32 and float64) whose rows
// hold whole 16-lane vectors are read where they are instead of copied: a
// strided row-major tile is what the micro-kernels take. Null otherwise.
template <typename T, typename Acc>
inline const Acc* in_place(const T* x, int64_t cols) {
  if constexpr (std::is_same<T, Acc>::value) {
    return cols % 16 == 0 ? x : nullptr;
  } else {
    (void)x;
    (void)cols;
    return nullptr;
  }
}
// Whether s = 2^e with |e| <= 64: multiplying a float by it is exact unless
// the product leaves the normal range.
inline bool power_of_two(double s) {
  int e = 0;
  return s > 0 && std::frexp(s, &e) == 0.5 && e - 1 >= -64 && e - 1 <= 64;
}
// Whether the kernels form the logits as scale * (q . k) from q as it is
// (read in place where in_place allows) instead of (scale q) . k from a
// scaled copy: float32 and float64 inputs with a power-of-two scale. Both
// give the same bits unless products underflow or overflow, so the forward
// and every backward pass follow this one rule (each backward form then sums
// dk = scale * (dS^T q), scaled once at the end): the fused and three-pass
// backward stay bitwise equal, whatever the thread count.
template <typename T>
inline bool unscaled_q(double scale) {
  return std::is_same<T, typename cpu::AccType<T>::type>::value && power_of_two(scale);
}

// Operands of the raw bfloat16 products (cpu::raw_products): the bits of a
// bfloat16 input as they are; other types (never multiplied this way, as
// raw_products offers the products for bfloat16 inputs only) rounded to it.
template <typename T>
inline uint16_t bf16_bits(const T& x) {
  if constexpr (std::is_same<T, bfloat16_t>::value) {
    return x.bits;
  } else {
    return cpu::to_bfloat16(static_cast<float>(cpu::to_float(x))).bits;
  }
}
// dst[r * ld + c] = src[r * stride + c] as bfloat16 bits.
template <typename T>
void load_bits(const T* src, int64_t stride, int64_t rows, int64_t cols, uint16_t* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * ld + c] = bf16_bits(src[r * stride + c]);
}
// src^T [cols][rows] pair-interleaved (see Bf16Kernels): element (c, r) at
// dst[(c / 2) * ld + 2 * r + c % 2]. With odd cols the partner of the last
// column is never written, so it keeps the buffer's initial zero.
template <typename T>
void load_pairs_t(const T* src, int64_t stride, int64_t rows, int64_t cols, uint16_t* dst, int64_t ld) {
  if constexpr (std::is_same<T, bfloat16_t>::value) {
    static const auto vectorised = cpu::raw_products<T>().pairs_t;
    if (vectorised != nullptr && rows > 0 && (rows - 1) * stride + cols < (int64_t(1) << 31))
      return vectorised(reinterpret_cast<const uint16_t*>(src), stride, rows, cols, dst, ld);
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[(c / 2) * ld + 2 * r + (c & 1)] = bf16_bits(src[r * stride + c]);
}
// src [rows][cols] as bfloat16 row pairs (B of Bf16Kernels::gemm over the
// rows): element (r, c) at dst[(r / 2) * ld + 2 * c + r % 2]. With odd rows
// the partner of the last row is never written, so it keeps the buffer's
// initial zero.
template <typename T>
void load_row_pairs(const T* src, int64_t stride, int64_t rows, int64_t cols, uint16_t* dst, int64_t ld) {
  if constexpr (std::is_same<T, bfloat16_t>::value) {
    static const auto vectorised = cpu::raw_products<T>().row_pairs;
    static_assert(sizeof(bfloat16_t) == sizeof(uint16_t), "bfloat16_t holds its bits");
    if (vectorised != nullptr) return vectorised(reinterpret_cast<const uint16_t*>(src), stride, rows, cols, dst, ld);
  }
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* d = dst + (r / 2) * ld + (r & 1);
    for (int64_t c = 0; c < cols; ++c) d[2 * c] = bf16_bits(src[r * stride + c]);
  }
}
// x[r * ld + c] *= scale for r < rows, c < cols (logits from unscaled q).
template <typename Acc>
void scale_rows(Acc* x, int64_t ld, int64_t rows, int64_t cols, Acc scale) {
  if constexpr (std::is_same_v<Acc, float>) {
    // In place through the vectorised copy (it reads each vector before writing it).
    if (const cpu::CopyKernels* ck = f32_copies()) return ck->rows(x, ld, rows, cols, scale, x, ld);
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) x[r * ld + c] *= scale;
}

// ---------------------------------------------------------------------------
// Masks and dropout.

struct MaskView {
  const bool* mask;  // null: no explicit mask
  MaskStrides st;
  Band band;  // query t may see keys t + band.lo .. t + band.hi (causal, window, query offset)

  // Whether some entry of the tile rows [t0, t0 + nr) x keys [s0, s0 + nc)
  // lies in the band, and whether all of them do.
  bool tile_meets_band(int64_t t0, int64_t nr, int64_t s0, int64_t nc) const {
    return s0 + nc - 1 - t0 >= band.lo && s0 - (t0 + nr - 1) <= band.hi;
  }
  bool tile_inside_band(int64_t t0, int64_t nr, int64_t s0, int64_t nc) const {
    return s0 - (t0 + nr - 1) >= band.lo && s0 + nc - 1 - t0 <= band.hi;
  }
  // Whether the tile needs any masking.
  bool tile_needs_mask(int64_t t0, int64_t nr, int64_t s0, int64_t nc) const {
    return mask != nullptr || !tile_inside_band(t0, nr, s0, nc);
  }
  bool allowed(int64_t b, int64_t n, int64_t t, int64_t s) const {
    if (s < t + band.lo || s > t + band.hi) return false;
    return mask == nullptr || mask[b * st.batch + n * st.head + t * st.row + s * st.col];
  }
  // The keys [key_begin, key_end) that query rows [t0, t0 + nr) may see, and
  // the query rows [query_begin, query_end) that keys [s0, s0 + nc) may be
  // seen by (within [0, S) and [0, T)): the only tiles any pass visits.
  int64_t key_begin(int64_t t0) const { return std::max<int64_t>(0, t0 + band.lo); }
  int64_t key_end(int64_t t0, int64_t nr, int64_t S) const {
    return std::max<int64_t>(0, std::min<int64_t>(S, t0 + nr + band.hi));
  }
  int64_t query_begin(int64_t s0) const { return std::max<int64_t>(0, s0 - band.hi); }
  int64_t query_end(int64_t s0, int64_t nc, int64_t T) const {
    return std::max<int64_t>(0, std::min<int64_t>(T, s0 + nc - band.lo));
  }
  // The vectorised masks, where the CPU has them and the mask's keys are
  // contiguous or broadcast; null otherwise.
  const cpu::MaskKernels* vectorised() const {
    static const cpu::MaskKernels* k = cpu::mask_kernels();
    return (mask == nullptr || st.col == 0 || st.col == 1) ? k : nullptr;
  }
  const bool* at(int64_t b, int64_t n, int64_t t, int64_t s) const {
    return mask == nullptr ? nullptr : mask + b * st.batch + n * st.head + t * st.row + s * st.col;
  }
  // Whether any entry of the tile rows [t0, t0 + nr) x keys [s0, s0 + nc) is
  // allowed. A tile with none has probabilities 0 everywhere, so the kernels
  // skip it: it would only add exact zeros (and 0 * v, which is NaN for a
  // masked key holding inf or NaN), so skipping changes no bit except the
  // sign of a zero sum. Every pass skips the same tiles: those outside the
  // band (past the causal diagonal, outside the window) and those an explicit
  // mask (padding) disallows entirely.
  bool tile_any_allowed(int64_t b, int64_t n, int64_t t0, int64_t nr, int64_t s0, int64_t nc) const {
    if (!tile_meets_band(t0, nr, s0, nc)) return false;  // no row of the tile sees these keys
    if (mask == nullptr) return true;
    if (const cpu::MaskKernels* k = vectorised()) {
      return k->any(at(b, n, t0, s0), st.row, st.col, t0 + band.lo - s0, t0 + band.hi - s0, nr, nc);
    }
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t c = 0; c < nc; ++c)
        if (allowed(b, n, t0 + r, s0 + c)) return true;
    return false;
  }
};

// Sets x[r * ld + c] = -inf for every disallowed (t0 + r, s0 + c).
template <typename Acc>
void apply_mask(const MaskView& mv, int64_t b, int64_t n, int64_t t0, int64_t nr, int64_t s0, int64_t nc, Acc* x,
                int64_t ld) {
  if constexpr (std::is_same<Acc, float>::value) {
    if (const cpu::MaskKernels* k = mv.vectorised()) {
      return k->apply(mv.at(b, n, t0, s0), mv.st.row, mv.st.col, t0 + mv.band.lo - s0, t0 + mv.band.hi - s0, nr, nc,
                      x, ld);
    }
  }
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t c = 0; c < nc; ++c)
      if (!mv.allowed(b, n, t0 + r, s0 + c)) x[r * ld + c] = neg_inf;
}

struct Dropout {
  bool on = false;
  uint64_t seed = 0;
  uint32_t threshold = 0;
  double inv_keep = 1.0;  // 1 / (1 - rate)
};

// From the params' derived fields (AttentionParams::finalize, called by the core).
Dropout make_dropout(const AttentionParams& p) {
  Dropout d;
  d.on = p.has_dropout != 0;
  d.seed = p.seed;
  d.threshold = p.dropout_threshold;
  d.inv_keep = p.inv_keep_f64;
  return d;
}

// out[c * step] = keep(b, n, t, s0 + c) / (1 - rate) or 0, for c < nc; s0 % 4 == 0,
// so one Philox call covers four consecutive keys. With apply, out[c * step]
// is multiplied by that factor instead.
template <typename Acc>
void dropout_factors(const Dropout& d, int64_t b, int64_t n, int64_t t, int64_t s0, int64_t nc, Acc* out,
                     int64_t step, bool apply = false) {
  const Acc kept = static_cast<Acc>(d.inv_keep);
  for (int64_t c = 0; c < nc; c += 4) {
    const Philox4 w = dropout_words(d.seed, static_cast<uint32_t>(b), static_cast<uint32_t>(n), static_cast<uint32_t>(t),
                                    static_cast<uint32_t>((s0 + c) >> 2));
    for (int64_t u = 0; u < 4 && c + u < nc; ++u) {
      Acc& x = out[(c + u) * step];
      const Acc f = w.x[u] >= d.threshold ? kept : Acc(0);
      x = apply ? x * f : f;
    }
  }
}

// The same for the tile of rows t0 .. t0 + nr - 1 and keys s0 .. s0 + nc - 1
// (row r at out + r * ld), with the vectorised generator where there is one.
template <typename Acc>
void dropout_tile(const Dropout& d, int64_t b, int64_t n, int64_t t0, int64_t nr, int64_t s0, int64_t nc, Acc* out,
                  int64_t ld, bool apply) {
  if constexpr (std::is_same<Acc, float>::value) {
    static const cpu::DropoutTileFn vectorised = cpu::dropout_tile_kernel();
    if (vectorised != nullptr) {
      vectorised(d.seed, d.threshold, static_cast<float>(d.inv_keep), static_cast<uint32_t>(b),
                 static_cast<uint32_t>(n), static_cast<uint32_t>(t0), nr, s0, nc, out, ld, apply);
      return;
    }
  }
  for (int64_t r = 0; r < nr; ++r) dropout_factors(d, b, n, t0 + r, s0, nc, out + r * ld, int64_t(1), apply);
}

// A row with no allowed key: the uniform average of v (with dropout) over all S
// keys, read straight from v (such rows are rare).
template <typename T, typename Acc>
void uniform_row(const Dropout& d, const T* v, int64_t v_row_stride, int64_t S, int64_t Hv, int64_t b, int64_t n,
                 int64_t t, Acc* acc) {
  std::fill(acc, acc + Hv, Acc(0));
  if (S == 0) return;
  const Acc p = Acc(1) / static_cast<Acc>(S);
  const Acc kept = static_cast<Acc>(d.inv_keep);
  for (int64_t s = 0; s < S; ++s) {
    Acc w = p;
    if (d.on) w = dropout_keep(d.seed, d.threshold, static_cast<uint32_t>(b), static_cast<uint32_t>(n),
                               static_cast<uint32_t>(t), static_cast<uint32_t>(s))
                      ? p * kept
                      : Acc(0);
    const T* vs = v + s * v_row_stride;
    for (int64_t h = 0; h < Hv; ++h) acc[h] += w * load<T, Acc>(vs[h]);
  }
}

// The soft-cap micro-kernel for input type T (MicroKernels::soft_cap_half for
// the 16-bit types).
template <typename T>
inline auto soft_cap_fn(const MicroKernels<typename cpu::AccType<T>::type>& mk) {
  return std::is_same<T, half_t>::value || std::is_same<T, bfloat16_t>::value ? mk.soft_cap_half : mk.soft_cap;
}

// About how many keys a query row of the band sees (for the cost estimates
// of parallel_for): S, or the band's width where that is smaller.
inline int64_t band_keys(const Band& band, int64_t S) {
  return band.hi - band.lo < S ? band.hi - band.lo + 1 : S;
}

// Maps the position of a query tile inside its (b, n) group to a tile index so
// that consecutive work items alternate long and short causal rows (0, last,
// 1, last-1, ...): contiguous ranges of items then carry similar work. Only
// for a band open to the left (causal without a window): under a sliding
// window every row sees about the same number of keys, and tiles in order
// keep the window's key tiles in cache from one item to the next (the
// interleaved order made a window of 512 at T 8192, H 128 run at 60% of the
// causal run's GFLOP/s).
inline int64_t interleave(int64_t pos, int64_t count, const Band& band) {
  if (band.hi >= kUnbounded || band.lo > -kUnbounded) return pos;
  return (pos % 2 == 0) ? pos / 2 : count - 1 - pos / 2;
}

// ---------------------------------------------------------------------------
// Forward.

// Whether query row t may see any key (rows whose l is 0 only: O(S)).
inline bool row_has_allowed_key(const MaskView& mv, int64_t b, int64_t n, int64_t t, int64_t S) {
  for (int64_t s = mv.key_begin(t); s < mv.key_end(t, 1, S); ++s)
    if (mv.allowed(b, n, t, s)) return true;
  return false;
}

template <typename T>
void fwd_impl(const AttentionFwdParams& p, const CpuContext& ctx) {
  using Acc = typename cpu::AccType<T>::type;
  const MicroKernels<Acc>& mk = cpu::micro_kernels<Acc>();
  const AttentionShape& sh = p.shape;
  const int64_t B = sh.batch, T_ = sh.seqlen_q, S = sh.seqlen_k, N = sh.num_heads, Nkv = sh.num_heads_kv;
  const int64_t H = sh.head_dim, Hv = sh.head_dim_v, group = N / Nkv;
  const int64_t Hp = round_up(H, kPad), Hvp = round_up(Hv, kPad);
  const int64_t nqt = ceil_div(T_, kBr);
  const int64_t items = B * N * nqt;
  if (items == 0) return;

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* o = static_cast<T*>(p.o);
  Acc* lse = static_cast<Acc*>(p.lse);
  const TensorStrides sq = p.q_strides, sk = p.k_strides, sv = p.v_strides, so = p.o_strides;
  const MaskView mv{p.mask, p.mask_strides, p.band};
  const Dropout drop = make_dropout(p);
  const Acc scale = static_cast<Acc>(p.scale);
  const Acc cap = static_cast<Acc>(p.logits_soft_cap);
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();

  // Converted K^T and V tiles of a whole (b, kv head) are kept for the next
  // work items of the chunk (consecutive items share the head), when all of
  // them fit in kKvCacheElems; otherwise every tile is converted when used.
  // The conversion is exact, so the results are the same either way.
  const int64_t nkt = ceil_div(S, kBc);
  const bool cache_kv = nkt * (Hp + Hvp) * kBc <= kKvCacheElems;
  const int64_t slots = cache_kv ? std::max<int64_t>(nkt, 1) : 1;

  // Logits from the raw bfloat16 products where cpu::raw_products offers them
  // (bfloat16 inputs, AVX512-BF16): scale * (q . k) from vdpbf16ps (exact
  // products, float32 sums, as the backward's), K^T cached pair-interleaved.
  const cpu::RawProducts<Acc> raw = cpu::raw_products<T>();
  const bool bits = raw.gemm != nullptr;
  const int64_t Hp2 = round_up(H, 2);

  // q (see unscaled_q) and V are read in place where in_place allows.
  const bool q_unscaled = unscaled_q<T>(p.scale);
  const bool q_direct = q_unscaled && in_place<T, Acc>(q, H) != nullptr;
  const bool v_direct = in_place<T, Acc>(v, Hv) != nullptr;

  const int64_t cost = kBr * std::max<int64_t>(band_keys(p.band, S), 1) * (H + Hv) * 2;
  ctx.parallel_for(items, cost, [&](int64_t begin, int64_t end) {
    // Per-chunk scratch; zero-initialised so that padding lanes are finite.
    Scratch<Acc> qs(bits || q_direct ? 0 : kBr * Hp, 0), kt(bits ? 0 : slots * Hp * kBc, 0),
        vt(v_direct ? 0 : slots * kBc * Hvp, 0),
        st(kBr * kBc, 0), acc(kBr * Hvp, 0), m(kBr), l(kBr);
    Scratch<uint16_t> qb(bits ? kBr * Hp2 : 0, 0), ktb(bits ? slots * Hp2 * kBc : 0, 0);
    Scratch<char> cached(slots, 0);  // which key tiles of head cached_bh are in kt, vt
    int64_t cached_bh = -1;          // (b * Nkv + hk)
    for (int64_t w = begin; w < end; ++w) {
      const int64_t qi = interleave(w % nqt, nqt, p.band);
      const int64_t n = (w / nqt) % N, b = w / (nqt * N), hk = n / group;
      if (b * Nkv + hk != cached_bh) {
        cached_bh = b * Nkv + hk;
        std::fill(cached.begin(), cached.end(), char(0));
      }
      const int64_t t0 = qi * kBr, nr = std::min(kBr, T_ - t0);
      // logits = (scale q) . k, or scale * (q . k) (unscaled_q); the backward
      // forms them the same way.
      const Acc* qa = q_direct ? in_place<T, Acc>(q + sq.offset(b, t0, n), H) : qs.data();
      const int64_t ldq = q_direct ? sq.seq : Hp;
      if (bits) {
        load_bits(q + sq.offset(b, t0, n), sq.seq, nr, H, qb.data(), Hp2);
      } else if (!q_direct) {
        copy_tile(q + sq.offset(b, t0, n), sq.seq, nr, H, q_unscaled ? Acc(1) : scale, qs.data(), Hp);
      }
      std::fill(acc.begin(), acc.end(), Acc(0));
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), Acc(0));

      // Only the key tiles the rows' band reaches (causal, window, offset).
      const int64_t s_end = mv.key_end(t0, nr, S);
      for (int64_t s0 = mv.key_begin(t0) / kBc * kBc; s0 < s_end; s0 += kBc) {
        const int64_t nc = std::min(kBc, S - s0), ncp = round_up(nc, kPad);
        const T* kb = k + sk.offset(b, s0, hk);
        const T* vb = v + sv.offset(b, s0, hk);
        const int64_t tile = s0 / kBc, slot = cache_kv ? tile : 0;
        Acc* ktile = bits ? nullptr : kt.data() + slot * Hp * kBc;
        uint16_t* ktbtile = bits ? ktb.data() + slot * Hp2 * kBc : nullptr;
        const Acc* vtile = v_direct ? in_place<T, Acc>(vb, Hv) : vt.data() + slot * kBc * Hvp;
        const int64_t ldv = v_direct ? sv.seq : Hvp;
        if (!mv.tile_any_allowed(b, n, t0, nr, s0, nc)) continue;  // all probabilities 0
        if (!cache_kv || !cached[slot]) {
          if (bits) {
            load_pairs_t(kb, sk.seq, nc, H, ktbtile, 2 * kBc);
          } else {
            load_tile_t(kb, sk.seq, nc, H, Acc(1), ktile, kBc);
          }
          if (!v_direct) copy_tile(vb, sv.seq, nc, Hv, Acc(1), vt.data() + slot * kBc * Hvp, Hvp);
          cached[slot] = 1;
        }
        if (bits) {
          raw.gemm(nr, ncp, Hp2 / 2, qb.data(), Hp2, ktbtile, 2 * kBc, st.data(), kBc, false);
          scale_rows(st.data(), kBc, nr, nc, scale);
        } else {
          mk.gemm(nr, ncp, H, qa, ldq, ktile, kBc, st.data(), kBc, false);
          if (q_unscaled) scale_rows(st.data(), kBc, nr, nc, scale);
        }
        if (p.has_soft_cap) soft_cap_fn<T>(mk)(nr, nc, st.data(), kBc, cap, nullptr);
        if (mv.tile_needs_mask(t0, nr, s0, nc)) apply_mask(mv, b, n, t0, nr, s0, nc, st.data(), kBc);

        // Online softmax (FlashAttention-2): running max m and normaliser l
        // without dropout; acc holds the unnormalised output.
        mk.softmax_step(nr, nc, st.data(), kBc, m.data(), l.data(), acc.data(), Hvp, Hv);
        if (drop.on) {
          dropout_tile(drop, b, n, t0, nr, s0, nc, st.data(), kBc, true);
        }
        mk.gemm(nr, Hvp, nc, st.data(), kBc, vtile, ldv, acc.data(), Hvp, true);
      }

      for (int64_t r = 0; r < nr; ++r) {
        const int64_t t = t0 + r;
        T* orow = o + so.offset(b, t, n);
        Acc* ar = acc.data() + r * Hvp;
        if (l[r] != Acc(0)) {  // (NaN too: a NaN logit or an inf one makes the row NaN, as the reference math)
          copy_tile(ar, Hvp, 1, Hv, Acc(1) / l[r], orow, int64_t(0));
          lse[(b * N + n) * T_ + t] = m[r] + std::log(l[r]);
        } else if (row_has_allowed_key(mv, b, n, t, S)) {
          // Allowed keys, every logit -inf (an inf input): softmax gives
          // -inf - (-inf) = NaN in the reference math, not the empty row's average.
          const Acc nan = std::numeric_limits<Acc>::quiet_NaN();
          std::fill(ar, ar + Hv, nan);
          copy_tile(ar, Hvp, 1, Hv, Acc(1), orow, int64_t(0));
          lse[(b * N + n) * T_ + t] = nan;
        } else {
          uniform_row(drop, v + sv.offset(b, 0, hk), sv.seq, S, Hv, b, n, t, ar);
          copy_tile(ar, Hvp, 1, Hv, Acc(1), orow, int64_t(0));
          lse[(b * N + n) * T_ + t] = std::numeric_limits<Acc>::infinity();
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------
// Backward.
//
// With D = keep / (1 - rate), o = sum_s p_s D_s v_s and logits x_s:
//   dv_s  += p_s D_s do
//   dp_s   = D_s (do . v_s)                    (gradient w.r.t. p_s)
//   dx_s   = p_s (dp_s - sum_s' p_s' dp_s') = p_s (D_s (do . v_s) - delta)
//   delta  = sum_s p_s D_s (do . v_s) = do . o
// and with x = (scale q) . k: dq = scale sum_s dx_s k_s, dk_s = dx_s (scale q).
// Rows with lse = +inf (no allowed key) have p = 1/S, constant in q and k: they
// add (1/S) D_s do to dv_s and nothing to dq and dk.

// bfloat16 operands of the logits and dP products (AVX512-BF16): both are dot
// products over the head dimension of bf16 inputs, so vdpbf16ps computes them
// with exact products and float32 sums, as scale * (q . k). (The forward's bf16
// Q K^T measured slower, 62 -> 67-73 ms single-threaded, while it
// pair-interleaved every K tile per query tile; with the K^T tiles of a head
// cached per chunk it is faster, and forward and backward logits now agree.)
// The forward's P V stays float32: rounding P to bf16 before P V (as GPU flash
// kernels do) made the test harness fail the accuracy criterion (dq, dk up to
// 1.45x the bound at T=S=7, dropout 0.3) because delta = dO . o then drifts
// from the recomputed P. The backward's P^T dO, dS^T Q and dS K take P and dS
// rounded to bf16 after dS is formed in float32 (what the plain bfloat16 math
// stores), so delta and P stay consistent: over 60 shapes (T, S up to 1025,
// H 40-256, GQA, causal, dropout 0.3, q scaled 4x) the worst error stayed at
// 0.53 of the bound (dv 0.21 -> 0.27), and the bfloat16 backward ran 15-30%
// faster (B 1, N 4, dropout 0.1, 2 threads: T 512 H 256 16-17.5 -> 12-13.5
// ms; T 2048 H 64 56.7 -> 42-47 ms).
template <typename Acc>
struct RawOperands {
  cpu::RawProducts<Acc> raw;
  const uint16_t *q = nullptr, *do_ = nullptr, *kt = nullptr, *vt = nullptr;
  int64_t Hp2 = 0, Hvp2 = 0;
  Acc scale = 0;
};

// Scratch and the shared per-tile math of every backward pass.
//
// "Wide" (float32 inputs): dS = P (dP - delta) comes from the micro-kernel
// ds_wide, which sums dP = dO V^T in float64 (exactly in the portable tier,
// from float32 chunk sums in the AVX-512 tier) and forms dS in float64 with
// delta (always float64, see bwd_impl), rounded once to float32.
// When one key dominates a row, dP_s ~ delta and their difference cancels:
// float32 rounding of dP (a few ulps of |dP|) then dominated dq and dk, while
// the naive float32 gradient, whose delta = sum P dP is summed from the same
// rounded dP, cancels its own error (T=S=128, H=64, causal MQA: dq 2.1e-6
// against the criterion's bound 1.96e-6). Half types have larger floors and
// keep the float32 product.
//
// Soft-capping (cap > 0): the logits are cap * tanh(x / cap) of the raw
// logits x, so dS (the gradient of the capped logits) is multiplied by their
// derivative 1 - tanh^2 (kept in dcap while the tile is computed) before it
// reaches dq and dk.
template <typename Acc>
struct BwdTile {
  int64_t Hp, Hvp;
  Scratch<Acc> qs, dob, kt, vt, pb, dsb, dm, lse_r, dcap;
  Scratch<double> delta_r;
  bool wide;
  Acc cap;  // 0: no soft-capping
  void (*soft_cap)(int64_t nr, int64_t nc, Acc* x, int64_t ld, Acc cap, Acc* d);  // soft_cap_fn's
  BwdTile(int64_t hp, int64_t hvp, bool wide_, Acc cap_, decltype(soft_cap) soft_cap_)
      : Hp(hp), Hvp(hvp), qs(kBr * hp, 0), dob(kBr * hvp, 0), kt(hp * kBc, 0), vt(hvp * kBc, 0), pb(kBr * kBc, 0),
        dsb(kBr * kBc, 0), dm(kBr * kBc, 0), lse_r(kBr), dcap(cap_ > 0 ? kBr * kBc : 0, 0), delta_r(kBr),
        wide(wide_), cap(cap_), soft_cap(soft_cap_) {}

  // From (scale q) [nr][ldq] (or q itself with q_scale = scale, a power of
  // two: the same logits), dO [nr][lddo], K^T and V^T [.][kBc], lse and delta
  // of rows [t0, t0+nr) and keys [s0, s0+nc): pb = p * D (dropped
  // probabilities) and dsb = dx, both [nr][kBc] row-major. The operands are
  // passed explicitly so that the fused pass can point into whole-sequence
  // buffers or the inputs; the arithmetic is the same whoever calls it
  // (determinism).
  void compute(const MicroKernels<Acc>& mk, const MaskView& mv, const Dropout& drop, int64_t b, int64_t n, int64_t t0,
               int64_t nr, int64_t s0, int64_t nc, int64_t H, int64_t Hv, const Acc* q_, int64_t ldq, Acc q_scale,
               const Acc* do_, int64_t lddo, const Acc* kt_, const Acc* vt_, const Acc* lse_, const double* delta_,
               const RawOperands<Acc>* bf = nullptr) {
    compute_ds(mk, mv, drop, b, n, t0, nr, s0, nc, H, Hv, q_, ldq, q_scale, do_, lddo, kt_, vt_, lse_, delta_, bf);
    if (cap > 0) {
      for (int64_t r = 0; r < nr; ++r) {
        Acc* dr = dsb.data() + r * kBc;
        const Acc* cr = dcap.data() + r * kBc;
        for (int64_t c = 0; c < nc; ++c) dr[c] *= cr[c];
      }
    }
  }
  void compute_ds(const MicroKernels<Acc>& mk, const MaskView& mv, const Dropout& drop, int64_t b, int64_t n,
                  int64_t t0, int64_t nr, int64_t s0, int64_t nc, int64_t H, int64_t Hv, const Acc* q_, int64_t ldq,
                  Acc q_scale, const Acc* do_, int64_t lddo, const Acc* kt_, const Acc* vt_, const Acc* lse_,
                  const double* delta_, const RawOperands<Acc>* bf) {
    const int64_t ncp = round_up(nc, kPad);
    const bool use_bf = bf != nullptr && bf->raw.gemm != nullptr;
    if (use_bf) {
      bf->raw.gemm(nr, ncp, bf->Hp2 / 2, bf->q, bf->Hp2, bf->kt, 2 * kBc, pb.data(), kBc, false);
      scale_rows(pb.data(), kBc, nr, nc, bf->scale);
    } else {
      mk.gemm(nr, ncp, H, q_, ldq, kt_, kBc, pb.data(), kBc, false);
      if (q_scale != Acc(1)) scale_rows(pb.data(), kBc, nr, nc, q_scale);
    }
    if (cap > 0) soft_cap(nr, nc, pb.data(), kBc, cap, dcap.data());
    if (mv.tile_needs_mask(t0, nr, s0, nc)) apply_mask(mv, b, n, t0, nr, s0, nc, pb.data(), kBc);
    // p = exp(x - lse); lse = +inf (fully masked row) gives p = 0 here.
    for (int64_t r = 0; r < nr; ++r) mk.exp_shift_sum(pb.data() + r * kBc, nc, lse_[r]);
    // do . v_s
    if (use_bf) bf->raw.gemm(nr, ncp, bf->Hvp2 / 2, bf->do_, bf->Hvp2, bf->vt, 2 * kBc, dsb.data(), kBc, false);
    if (wide && !use_bf) {
      if (drop.on) dropout_tile(drop, b, n, t0, nr, s0, nc, dm.data(), kBc, false);
      // With dropout, ds_wide also turns pb into the dropped probabilities.
      mk.ds_wide(nr, ncp, Hv, do_, lddo, vt_, kBc, pb.data(), drop.on ? dm.data() : nullptr, delta_, dsb.data(), kBc);
      return;
    }
    if (!use_bf) mk.gemm(nr, ncp, Hv, do_, lddo, vt_, kBc, dsb.data(), kBc, false);
    if (drop.on) dropout_tile(drop, b, n, t0, nr, s0, nc, dm.data(), kBc, false);
    if (mk.ds_narrow != nullptr) {
      mk.ds_narrow(nr, nc, pb.data(), drop.on ? dm.data() : nullptr, delta_, dsb.data(), kBc);
      return;
    }
    for (int64_t r = 0; r < nr; ++r) {
      Acc* pr = pb.data() + r * kBc;
      Acc* dr = dsb.data() + r * kBc;
      const Acc dl = static_cast<Acc>(delta_[r]);
      if (drop.on) {
        const Acc* fr = dm.data() + r * kBc;
        for (int64_t c = 0; c < nc; ++c) {
          dr[c] = pr[c] * (fr[c] * dr[c] - dl);
          pr[c] *= fr[c];
        }
      } else {
        for (int64_t c = 0; c < nc; ++c) dr[c] = pr[c] * (dr[c] - dl);
      }
    }
  }
  void compute(const MicroKernels<Acc>& mk, const MaskView& mv, const Dropout& drop, int64_t b, int64_t n, int64_t t0,
               int64_t nr, int64_t s0, int64_t nc, int64_t H, int64_t Hv, Acc q_scale) {
    compute(mk, mv, drop, b, n, t0, nr, s0, nc, H, Hv, qs.data(), Hp, q_scale, dob.data(), Hvp, kt.data(), vt.data(),
            lse_r.data(), delta_r.data());
  }
};

// The fused backward keeps whole-sequence copies of one head's q, dO, dq and
// one kv head's k, K^T, V^T, dk, dv per work chunk (float, or bf16 operands
// with the raw products): O((T + S) H), never T x S. Above this many floats it
// falls back to the three-pass form.
constexpr int64_t kFusedBwdMaxFloats = int64_t(1) << 24;  // 64 MiB of float32

// Everything the backward passes share: sizes, typed pointers, micro-kernels,
// mask, dropout and delta = rowsum(dO * O); the passes are its members.
template <typename T>
struct BwdProblem {
  using Acc = typename cpu::AccType<T>::type;
  // float32: dP and dS in float64 (see BwdTile).
  static constexpr bool kWide = cpu::wide_ds<T>();

  const AttentionBwdParams& p;
  const MicroKernels<Acc>& mk;
  int64_t B, T_, S, N, Nkv, H, Hv, group, Hp, Hvp, nqt, nkt;
  const T *q, *k, *v, *o, *dout;
  const Acc* lse;
  T *dq, *dk, *dv;
  double* delta;
  TensorStrides sq, sk, sv, so, sdo, sdq, sdk, sdv;
  MaskView mv;
  Dropout drop;
  Acc scale, inf;
  Acc cap;  // logits_soft_cap (0: off)
  bool q_unscaled;   // see unscaled_q
  Acc q_scale;       // the factor of the logits and of dk: scale when q_unscaled, else 1
  Acc q_copy_scale;  // the factor q is copied with: 1 when q_unscaled, else scale
  // The fused pass reads these in place (in_place; the raw bfloat16 products
  // never do, as in_place refuses bfloat16).
  bool k_direct, do_direct, q_direct;

  explicit BwdProblem(const AttentionBwdParams& p_)
      : p(p_),
        mk(cpu::micro_kernels<Acc>()),
        B(p_.shape.batch),
        T_(p_.shape.seqlen_q),
        S(p_.shape.seqlen_k),
        N(p_.shape.num_heads),
        Nkv(p_.shape.num_heads_kv),
        H(p_.shape.head_dim),
        Hv(p_.shape.head_dim_v),
        group(Nkv > 0 ? N / Nkv : 0),
        Hp(round_up(H, kPad)),
        Hvp(round_up(Hv, kPad)),
        nqt(ceil_div(T_, kBr)),
        nkt(ceil_div(S, kBc)),
        q(static_cast<const T*>(p_.q)),
        k(static_cast<const T*>(p_.k)),
        v(static_cast<const T*>(p_.v)),
        o(static_cast<const T*>(p_.o)),
        dout(static_cast<const T*>(p_.do_)),
        lse(static_cast<const Acc*>(p_.lse)),
        dq(static_cast<T*>(p_.dq)),
        dk(static_cast<T*>(p_.dk)),
        dv(static_cast<T*>(p_.dv)),
        delta(static_cast<double*>(p_.workspace)),
        sq(p_.q_strides),
        sk(p_.k_strides),
        sv(p_.v_strides),
        so(p_.o_strides),
        sdo(p_.do_strides),
        sdq(p_.dq_strides),
        sdk(p_.dk_strides),
        sdv(p_.dv_strides),
        mv{p_.mask, p_.mask_strides, p_.band},
        drop(make_dropout(p_)),
        scale(static_cast<Acc>(p_.scale)),
        inf(std::numeric_limits<Acc>::infinity()),
        cap(static_cast<Acc>(p_.logits_soft_cap)),
        q_unscaled(unscaled_q<T>(p_.scale)),
        q_scale(q_unscaled ? scale : Acc(1)),
        q_copy_scale(q_unscaled ? Acc(1) : scale),
        k_direct(in_place<T, Acc>(k, H) != nullptr),
        do_direct(in_place<T, Acc>(dout, Hv) != nullptr),
        q_direct(q_unscaled && in_place<T, Acc>(q, H) != nullptr) {}

  // delta[b, n, t] = do . o
  void compute_delta(const CpuContext& ctx) const {
    const int64_t rows = B * T_ * N;
    if (rows == 0) return;
    ctx.parallel_for(rows, 2 * Hv, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {  // i = (b * T + t) * N + n
        const int64_t n = i % N, t = (i / N) % T_, b = i / (N * T_);
        const T* orow = o + so.offset(b, t, n);
        const T* drow = dout + sdo.offset(b, t, n);
        // Summed in double: every dS of the row subtracts delta, so its
        // rounding error reaches dq and dk scaled by the whole row; a float
        // sum over Hv terms made dq 8x less accurate than the naive float32
        // gradient (T=S=128, H=64, causal MQA).
        double sum = 0;
        for (int64_t h = 0; h < Hv; ++h) {
          sum += static_cast<double>(load<T, Acc>(drow[h])) * static_cast<double>(load<T, Acc>(orow[h]));
        }
        delta[(b * N + n) * T_ + t] = sum;
      }
    });
  }

  // Loads q (scaled unless q_unscaled, as the forward), dO, lse and delta of one query tile.
  void load_query_tile(BwdTile<Acc>& tile, int64_t b, int64_t n, int64_t t0, int64_t nr) const {
    copy_tile(q + sq.offset(b, t0, n), sq.seq, nr, H, q_copy_scale, tile.qs.data(), Hp);
    copy_tile(dout + sdo.offset(b, t0, n), sdo.seq, nr, Hv, Acc(1), tile.dob.data(), Hvp);
    for (int64_t r = 0; r < nr; ++r) {
      tile.lse_r[r] = lse[(b * N + n) * T_ + t0 + r];
      tile.delta_r[r] = delta[(b * N + n) * T_ + t0 + r];
    }
  }

  // Fully masked rows (lse = +inf) of query tile [t0, t0+nr), wherever they
  // are (also in causally skipped tiles): p = 1/S adds (1/S) D_s do to dv_s.
  void uniform_rows_dv(int64_t b, int64_t n, int64_t t0, int64_t nr, int64_t s0, int64_t nc, Acc* dv_tile, Acc* fm,
                       Acc* uni) const {
    const Acc* lse_tile = lse + (b * N + n) * T_ + t0;
    for (int64_t r = 0; r < nr; ++r) {
      if (lse_tile[r] != inf) continue;
      const int64_t t = t0 + r;
      const T* drow = dout + sdo.offset(b, t, n);
      for (int64_t h = 0; h < Hv; ++h) uni[h] = load<T, Acc>(drow[h]) / static_cast<Acc>(S);
      if (drop.on) dropout_factors(drop, b, n, t, s0, nc, fm, int64_t(1));
      for (int64_t c = 0; c < nc; ++c) {
        const Acc f = drop.on ? fm[c] : Acc(1);
        if (f == Acc(0)) continue;
        Acc* dvr = dv_tile + c * Hvp;
        for (int64_t h = 0; h < Hv; ++h) dvr[h] += f * uni[h];
      }
    }
  }

  // Whole-sequence floats one fused work item keeps (see kFusedBwdMaxFloats):
  // k rows (unless read in place), K^T, V^T, dk and dv sums; q and dO
  // (unless read in place), dq sums, lse and delta. bits (the raw bfloat16
  // products): the sums, lse and delta, and the bf16 operands instead of the
  // float copies, counted as half a float each.
  int64_t fused_floats(bool bits) const {
    const int64_t Sp = nkt * kBc, Tp = nqt * kBr, Hp2 = round_up(H, 2), Hvp2 = round_up(Hv, 2);
    if (bits) {
      // dk, dv, dq sums, lse and delta; bf16: q, dO (bits and row pairs),
      // K^T, V^T, k row pairs.
      return Sp * (Hp + Hvp) + Tp * (Hp + 3) + ((Sp + Tp) * (Hp2 + Hvp2) + Tp * (Hp + Hvp) + Sp * Hp) / 2;
    }
    const int64_t per_key = (k_direct ? 2 : 3) * Hp + 2 * Hvp;
    const int64_t per_query = (q_direct ? 1 : 2) * Hp + (do_direct ? 0 : Hvp) + 3;
    return Sp * per_key + Tp * per_query;
  }

  // Fused pass: one item per (b, kv head) computes dq, dk and dv together, 5
  // tile GEMMs per (query tile, key tile) instead of the 7 of the three-pass
  // form (which recomputes S and dP for dq), and converts q, dO, k, v once per
  // item instead of once per tile pair. Every accumulator sums in the same
  // order as the three-pass form (dk, dv: query head, then query tile; dq: key
  // tile), with the same micro-kernel calls on the same values, so both forms
  // give bitwise-identical results and the choice may depend on the thread
  // count. Measured at B=1, N=8, T=S=2048, H=64, 2 threads: see the commit.
  // raw: the raw bfloat16 products (cpu::raw_products: every tile product on
  // bf16 operands), or none (null gemm). With them this pass differs from the
  // three-pass form (float products), so bwd_impl chooses it from the shape
  // alone.
  void fused_pass(const cpu::RawProducts<Acc>& raw, const CpuContext& ctx) const {
    const bool bits = raw.gemm != nullptr;
    const int64_t Sp = nkt * kBc, Tp = nqt * kBr, heads_kv = B * Nkv;
    const int64_t Hp2 = round_up(H, 2), Hvp2 = round_up(Hv, 2);
    const int64_t cost = std::max<int64_t>(band_keys(p.band, S), 1) * T_ * group * (3 * H + 2 * Hv) * 2;
    // Key tiles per sweep over the query tiles. One at a time, a head's query
    // side (q and dO rows, dq sums) is read once per key tile; where it is
    // larger than a core's L2 (~1 MiB), 4 key tiles share each query tile's
    // visit (their k, K^T, V^T and sums: 320 KiB at H 64, 1 MiB at H 256).
    // Every sum keeps its order (dq: key tile; dk, dv: query tile), so the
    // results are bitwise the same. Measured (float32 forward + backward, 2
    // threads, same process, alternating): B 1, N 4, T 2048, H 256:
    // 507 -> 458 ms; H 128: 278 -> 250; T 4096, N 2, H 64: 244 -> 223; B 4,
    // T 500, H 256: 121 -> 118; but B 2, N 8, T 1024, H 64 (768 KiB of
    // query side): 131 -> 136, hence the threshold.
    const int64_t key_group = Tp * (2 * Hp + Hvp) * int64_t(sizeof(Acc)) > (int64_t(1) << 20) ? 4 : 1;
    ctx.parallel_for(heads_kv, cost, [&](int64_t begin, int64_t end) {
      BwdTile<Acc> tile(Hp, Hvp, kWide, cap, soft_cap_fn<T>(mk));
      // With the raw products every tile product reads bf16 operands: no
      // float copies of q, dO, k, K^T, V^T.
      Scratch<Acc> kr(k_direct || bits ? 0 : Sp * Hp, 0), kt(bits ? 0 : Sp * Hp, 0), vt(bits ? 0 : Sp * Hvp, 0),
          dk_acc(Sp * Hp), dv_acc(Sp * Hvp), qa(q_direct || bits ? 0 : Tp * Hp, 0),
          doa(do_direct || bits ? 0 : Tp * Hvp, 0), dq_acc(Tp * Hp), lse_a(Tp), fm(kBc), uni(Hv);
      Scratch<char> uniform_tile(nqt, 0);
      Scratch<double> delta_a(Tp);
      // bf16: q, dO bits (logits, dP); K^T, V^T pairs; q, dO, k row pairs
      // (dS^T Q, P^T dO, dS K); P and dS of a tile pair as row pairs, dS as rows.
      Scratch<uint16_t> qb, dob, ktb, vtb, q2, do2, k2, p2, ds2, ds16;
      if (bits) {
        qb.assign(Tp * Hp2, 0);
        dob.assign(Tp * Hvp2, 0);
        ktb.assign(nkt * Hp2 * kBc, 0);
        vtb.assign(nkt * Hvp2 * kBc, 0);
        q2.assign(Tp * Hp, 0);
        do2.assign(Tp * Hvp, 0);
        k2.assign(Sp * Hp, 0);
        p2.assign(kBr * kBc, 0);
        ds2.assign(kBr * kBc, 0);
        ds16.assign(kBr * kBc, 0);
      }
      RawOperands<Acc> bf;
      bf.raw = raw;
      bf.Hp2 = Hp2;
      bf.Hvp2 = Hvp2;
      bf.scale = scale;
      for (int64_t w = begin; w < end; ++w) {
        const int64_t hk = w % Nkv, b = w / Nkv;
        const Acc* kp = k_direct ? in_place<T, Acc>(k + sk.offset(b, 0, hk), H) : kr.data();
        const int64_t ldk = k_direct ? sk.seq : Hp;
        for (int64_t kj = 0; kj < nkt; ++kj) {
          const int64_t s0 = kj * kBc, nc = std::min(kBc, S - s0);
          if (bits) {
            load_pairs_t(k + sk.offset(b, s0, hk), sk.seq, nc, H, ktb.data() + kj * Hp2 * kBc, 2 * kBc);
            load_pairs_t(v + sv.offset(b, s0, hk), sv.seq, nc, Hv, vtb.data() + kj * Hvp2 * kBc, 2 * kBc);
            load_row_pairs(k + sk.offset(b, s0, hk), sk.seq, nc, H, k2.data() + s0 * Hp, 2 * Hp);
            continue;
          }
          if (k_direct) {
            load_tile_t(kp + s0 * ldk, ldk, nc, H, Acc(1), kt.data() + kj * Hp * kBc, kBc);
          } else {
            copy_tile(k + sk.offset(b, s0, hk), sk.seq, nc, H, Acc(1), kr.data() + s0 * Hp, Hp);
            load_tile_t(kr.data() + s0 * Hp, Hp, nc, H, Acc(1), kt.data() + kj * Hp * kBc, kBc);
          }
          load_tile_t(v + sv.offset(b, s0, hk), sv.seq, nc, Hv, Acc(1), vt.data() + kj * Hvp * kBc, kBc);
        }
        std::fill(dk_acc.begin(), dk_acc.end(), Acc(0));
        std::fill(dv_acc.begin(), dv_acc.end(), Acc(0));
        for (int64_t n = hk * group; n < (hk + 1) * group; ++n) {
          const Acc* qp = q_direct ? in_place<T, Acc>(q + sq.offset(b, 0, n), H) : qa.data();
          const Acc* dop = do_direct ? in_place<T, Acc>(dout + sdo.offset(b, 0, n), Hv) : doa.data();
          const int64_t ldq = q_direct ? sq.seq : Hp, lddo = do_direct ? sdo.seq : Hvp;
          if (bits) {
            load_bits(q + sq.offset(b, 0, n), sq.seq, T_, H, qb.data(), Hp2);
            load_bits(dout + sdo.offset(b, 0, n), sdo.seq, T_, Hv, dob.data(), Hvp2);
            load_row_pairs(q + sq.offset(b, 0, n), sq.seq, T_, H, q2.data(), 2 * Hp);
            load_row_pairs(dout + sdo.offset(b, 0, n), sdo.seq, T_, Hv, do2.data(), 2 * Hvp);
          } else {
            if (!q_direct) copy_tile(q + sq.offset(b, 0, n), sq.seq, T_, H, q_copy_scale, qa.data(), Hp);
            if (!do_direct) copy_tile(dout + sdo.offset(b, 0, n), sdo.seq, T_, Hv, Acc(1), doa.data(), Hvp);
          }
          for (int64_t t = 0; t < T_; ++t) {
            lse_a[t] = lse[(b * N + n) * T_ + t];
            delta_a[t] = delta[(b * N + n) * T_ + t];
          }
          // Query tiles holding a row with no allowed key (lse = +inf): such
          // rows reach every key tile, also those outside the band.
          for (int64_t qi = 0; qi < nqt; ++qi) {
            uniform_tile[qi] = 0;
            for (int64_t t = qi * kBr; t < std::min(T_, (qi + 1) * kBr); ++t) uniform_tile[qi] |= lse_a[t] == inf;
          }
          std::fill(dq_acc.begin(), dq_acc.end(), Acc(0));
          for (int64_t kg = 0; kg < nkt; kg += key_group) {
            for (int64_t qi = 0; qi < nqt; ++qi) {
              const int64_t t0 = qi * kBr, nr = std::min(kBr, T_ - t0);
              for (int64_t kj = kg; kj < std::min(nkt, kg + key_group); ++kj) {
                const int64_t s0 = kj * kBc, nc = std::min(kBc, S - s0);
                const bool live = mv.tile_any_allowed(b, n, t0, nr, s0, nc);
                if (!live && !uniform_tile[qi]) continue;  // outside the band, or masked out
                if (live && bits) {
                  bf.q = qb.data() + t0 * Hp2;
                  bf.do_ = dob.data() + t0 * Hvp2;
                  bf.kt = ktb.data() + kj * Hp2 * kBc;
                  bf.vt = vtb.data() + kj * Hvp2 * kBc;
                  tile.compute(mk, mv, drop, b, n, t0, nr, s0, nc, H, Hv, nullptr, 0, q_scale, nullptr, 0, nullptr,
                               nullptr, lse_a.data() + t0, delta_a.data() + t0, &bf);
                  // P (dropped) and dS rounded to bf16 (what the plain
                  // bfloat16 math stores), pairs over query rows for P^T dO
                  // and dS^T Q, over keys for dS K; padding columns are 0.
                  const int64_t ncp = round_up(nc, kPad), kq = (nr + 1) / 2, ks = (nc + 1) / 2;
                  raw.pair_rows(tile.pb.data(), kBc, nr, ncp, p2.data(), 2 * kBc);
                  raw.pair_rows(tile.dsb.data(), kBc, nr, ncp, ds2.data(), 2 * kBc);
                  raw.to_bf16(tile.dsb.data(), nr * kBc, ds16.data());
                  raw.gemm_tn(nc, Hvp, kq, p2.data(), 2 * kBc, do2.data() + t0 * Hvp, 2 * Hvp,
                              dv_acc.data() + s0 * Hvp, Hvp);
                  raw.gemm_tn(nc, Hp, kq, ds2.data(), 2 * kBc, q2.data() + t0 * Hp, 2 * Hp, dk_acc.data() + s0 * Hp,
                              Hp);
                  raw.gemm(nr, Hp, ks, ds16.data(), kBc, k2.data() + s0 * Hp, 2 * Hp, dq_acc.data() + t0 * Hp, Hp,
                           true);
                } else if (live) {
                  tile.compute(mk, mv, drop, b, n, t0, nr, s0, nc, H, Hv, qp + t0 * ldq, ldq, q_scale, dop + t0 * lddo,
                               lddo, kt.data() + kj * Hp * kBc, vt.data() + kj * Hvp * kBc, lse_a.data() + t0,
                               delta_a.data() + t0, &bf);
                  mk.gemm_tn(nc, Hvp, nr, tile.pb.data(), kBc, dop + t0 * lddo, lddo, dv_acc.data() + s0 * Hvp, Hvp,
                             true);
                  mk.gemm_tn(nc, Hp, nr, tile.dsb.data(), kBc, qp + t0 * ldq, ldq, dk_acc.data() + s0 * Hp, Hp, true);
                  mk.gemm(nr, Hp, nc, tile.dsb.data(), kBc, kp + s0 * ldk, ldk, dq_acc.data() + t0 * Hp, Hp, true);
                }
                uniform_rows_dv(b, n, t0, nr, s0, nc, dv_acc.data() + s0 * Hvp, fm.data(), uni.data());
              }
            }
          }
          copy_tile(dq_acc.data(), Hp, T_, H, scale, dq + sdq.offset(b, 0, n), sdq.seq);
        }
        // dk sums (scaled q) k or, from q's bits, q k.
        copy_tile(dk_acc.data(), Hp, S, H, bits ? scale : q_scale, dk + sdk.offset(b, 0, hk), sdk.seq);
        copy_tile(dv_acc.data(), Hvp, S, Hv, Acc(1), dv + sdv.offset(b, 0, hk), sdv.seq);
      }
    });
  }

  // Three-pass form (few kv heads for the threads, or very long sequences).
  void three_pass(const CpuContext& ctx) const {
    // dk, dv: one item per (b, kv head, key tile), looping over every query head
    // of the group and every query tile, so the group sum needs no atomics.
    const int64_t kv_items = B * Nkv * nkt;
    if (kv_items > 0) {
      const int64_t cost = kBc * std::max<int64_t>(band_keys(p.band, T_), 1) * group * (2 * H + 2 * Hv);
      ctx.parallel_for(kv_items, cost, [&](int64_t begin, int64_t end) {
        BwdTile<Acc> tile(Hp, Hvp, kWide, cap, soft_cap_fn<T>(mk));
        Scratch<Acc> dk_acc(kBc * Hp, 0), dv_acc(kBc * Hvp, 0), fm(kBc), uni(Hv);
        for (int64_t w = begin; w < end; ++w) {
          const int64_t kj = interleave(w % nkt, nkt, p.band);
          const int64_t hk = (w / nkt) % Nkv, b = w / (nkt * Nkv);
          const int64_t s0 = kj * kBc, nc = std::min(kBc, S - s0);
          load_tile_t(k + sk.offset(b, s0, hk), sk.seq, nc, H, Acc(1), tile.kt.data(), kBc);
          load_tile_t(v + sv.offset(b, s0, hk), sv.seq, nc, Hv, Acc(1), tile.vt.data(), kBc);
          std::fill(dk_acc.begin(), dk_acc.end(), Acc(0));
          std::fill(dv_acc.begin(), dv_acc.end(), Acc(0));

          for (int64_t n = hk * group; n < (hk + 1) * group; ++n) {
            for (int64_t qi = 0; qi < nqt; ++qi) {
              const int64_t t0 = qi * kBr, nr = std::min(kBr, T_ - t0);
              if (mv.tile_any_allowed(b, n, t0, nr, s0, nc)) {
                load_query_tile(tile, b, n, t0, nr);
                tile.compute(mk, mv, drop, b, n, t0, nr, s0, nc, H, Hv, q_scale);
                mk.gemm_tn(nc, Hvp, nr, tile.pb.data(), kBc, tile.dob.data(), Hvp, dv_acc.data(), Hvp, true);
                mk.gemm_tn(nc, Hp, nr, tile.dsb.data(), kBc, tile.qs.data(), Hp, dk_acc.data(), Hp, true);
              }
              uniform_rows_dv(b, n, t0, nr, s0, nc, dv_acc.data(), fm.data(), uni.data());
            }
          }
          copy_tile(dk_acc.data(), Hp, nc, H, q_scale, dk + sdk.offset(b, s0, hk), sdk.seq);
          copy_tile(dv_acc.data(), Hvp, nc, Hv, Acc(1), dv + sdv.offset(b, s0, hk), sdv.seq);
        }
      });
    }

    // dq: one item per (b, head, query tile).
    const int64_t q_items = B * N * nqt;
    if (q_items > 0) {
      const int64_t cost = kBr * std::max<int64_t>(band_keys(p.band, S), 1) * (2 * H + Hv) * 2;
      ctx.parallel_for(q_items, cost, [&](int64_t begin, int64_t end) {
        BwdTile<Acc> tile(Hp, Hvp, kWide, cap, soft_cap_fn<T>(mk));
        Scratch<Acc> kb(kBc * Hp, 0), dq_acc(kBr * Hp, 0);
        for (int64_t w = begin; w < end; ++w) {
          const int64_t qi = interleave(w % nqt, nqt, p.band);
          const int64_t n = (w / nqt) % N, b = w / (nqt * N), hk = n / group;
          const int64_t t0 = qi * kBr, nr = std::min(kBr, T_ - t0);
          load_query_tile(tile, b, n, t0, nr);
          bool any_live = false;
          for (int64_t r = 0; r < nr; ++r) any_live = any_live || tile.lse_r[r] != inf;
          std::fill(dq_acc.begin(), dq_acc.end(), Acc(0));
          const int64_t s_end = !any_live ? 0 : mv.key_end(t0, nr, S);
          for (int64_t s0 = mv.key_begin(t0) / kBc * kBc; s0 < s_end; s0 += kBc) {
            const int64_t nc = std::min(kBc, S - s0);
            if (!mv.tile_any_allowed(b, n, t0, nr, s0, nc)) continue;  // all probabilities 0
            copy_tile(k + sk.offset(b, s0, hk), sk.seq, nc, H, Acc(1), kb.data(), Hp);
            load_tile_t(kb.data(), Hp, nc, H, Acc(1), tile.kt.data(), kBc);
            load_tile_t(v + sv.offset(b, s0, hk), sv.seq, nc, Hv, Acc(1), tile.vt.data(), kBc);
            tile.compute(mk, mv, drop, b, n, t0, nr, s0, nc, H, Hv, q_scale);
            mk.gemm(nr, Hp, nc, tile.dsb.data(), kBc, kb.data(), Hp, dq_acc.data(), Hp, true);
          }
          copy_tile(dq_acc.data(), Hp, nr, H, scale, dq + sdq.offset(b, t0, n), sdq.seq);
        }
      });
    }
  }
};

template <typename T>
void bwd_impl(const AttentionBwdParams& p, const CpuContext& ctx) {
  const BwdProblem<T> P(p);
  P.compute_delta(ctx);
  const cpu::RawProducts<typename BwdProblem<T>::Acc> raw = cpu::raw_products<T>();
  const bool bits = raw.gemm != nullptr;
  const int64_t heads_kv = P.B * P.Nkv, nthreads = std::max(1, ctx.num_threads);
  // (b, kv head) items are few: only fuse when they still spread evenly. The
  // raw bf16 products exist only in the fused pass, so with them the choice
  // must not depend on the thread count (determinism): fuse whenever memory
  // allows.
  const bool fused = heads_kv > 0 && P.T_ > 0 && P.S > 0 && P.fused_floats(bits) <= kFusedBwdMaxFloats &&
                     (bits || heads_kv % nthreads == 0 || heads_kv >= 4 * nthreads);
  if (fused) {
    P.fused_pass(raw, ctx);
  } else {
    P.three_pass(ctx);
  }
}

}  // namespace

int64_t attention_bwd_workspace_bytes(const AttentionShape& shape, DType dtype, int /*num_threads*/) {
  // delta = rowsum(dO * O) per [B, N, T], in float64 for every dtype; per-chunk
  // scratch is allocated by the work chunks themselves, so the thread count
  // does not matter.
  (void)dtype;
  return shape.batch * shape.num_heads * shape.seqlen_q * static_cast<int64_t>(sizeof(double));
}

Status attention_fwd_cpu(const AttentionFwdParams& p, const CpuContext& ctx) {
  TFA_RETURN_IF_ERROR(validate(p));
  switch (p.dtype) {
    case DType::kFloat16: fwd_impl<half_t>(p, ctx); break;
    case DType::kBFloat16: fwd_impl<bfloat16_t>(p, ctx); break;
    case DType::kFloat32: fwd_impl<float>(p, ctx); break;
    case DType::kFloat64: fwd_impl<double>(p, ctx); break;
  }
  return Status::OK();
}

Status attention_bwd_cpu(const AttentionBwdParams& p, const CpuContext& ctx) {
  TFA_RETURN_IF_ERROR(validate(p));
  switch (p.dtype) {
    case DType::kFloat16: bwd_impl<half_t>(p, ctx); break;
    case DType::kBFloat16: bwd_impl<bfloat16_t>(p, ctx); break;
    case DType::kFloat32: bwd_impl<float>(p, ctx); break;
    case DType::kFloat64: bwd_impl<double>(p, ctx); break;
  }
  return Status::OK();
}

}  // namespace tf_fastattn
