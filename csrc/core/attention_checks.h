// The attention's argument checks, shared by every front end (TensorFlow op,
// _C on NumPy arrays): a front end turns its tensors into Dims and calls these,
// so the same bad input gets the same message everywhere. Framework-free.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "tf_fastattn/attention.h"

namespace tf_fastattn {
namespace core {

// A tensor's shape as a front end sees it (rank <= kMaxRank).
struct Dims {
  static constexpr int kMaxRank = 8;
  int rank = 0;
  int64_t size[kMaxRank] = {};
  Dims() = default;
  Dims(std::initializer_list<int64_t> sizes);
  // From any rank/size accessor pair; rank > kMaxRank keeps the first kMaxRank
  // sizes and the true rank (the checks then reject it by rank).
  template <class SizeFn>
  static Dims from(int rank, SizeFn size_of) {
    Dims d;
    d.rank = rank;
    for (int i = 0; i < rank && i < kMaxRank; ++i) d.size[i] = static_cast<int64_t>(size_of(i));
    return d;
  }
  bool operator==(const Dims& o) const;
};

// "[2, 5, 4, 8]".
std::string dims_string(const Dims& d);

// query [B, T, N, H], key [B, S, Nkv, H], value [B, S, Nkv, Hv]: ranks,
// matching B / S / Nkv / H, N a multiple of Nkv, head dims in [1, kMaxHeadDim].
Status attention_shape(const Dims& q, const Dims& k, const Dims& v, AttentionShape* out);

// A mask of rank <= 4, left-padded with 1s, broadcastable to [B, N, T, S].
// Returns the padded sizes (1 on broadcast axes).
Status attention_mask_dims(const Dims& mask, const AttentionShape& s, int64_t padded[4]);

// attention_mask_dims, then the element strides of a dense (row-major) mask
// of that shape: 0 on the broadcast axes.
Status dense_mask_strides(const Dims& mask, const AttentionShape& s, MaskStrides* out);

// The backward's saved and upstream tensors: out and d_out [B, T, N, Hv],
// lse [B, N, T].
Status attention_bwd_inputs(const Dims& o, const Dims& lse, const Dims& d_o, const AttentionShape& s);

}  // namespace core
}  // namespace tf_fastattn
