#include "core/attention_checks.h"

#include <sstream>

namespace tf_fastattn {
namespace core {

Dims::Dims(std::initializer_list<int64_t> sizes) {
  for (int64_t s : sizes) {
    if (rank < kMaxRank) size[rank] = s;
    ++rank;
  }
}

bool Dims::operator==(const Dims& o) const {
  if (rank != o.rank) return false;
  for (int i = 0; i < rank && i < kMaxRank; ++i) {
    if (size[i] != o.size[i]) return false;
  }
  return true;
}

std::string dims_string(const Dims& d) {
  std::ostringstream os;
  os << "[";
  for (int i = 0; i < d.rank && i < Dims::kMaxRank; ++i) os << (i ? ", " : "") << d.size[i];
  if (d.rank > Dims::kMaxRank) os << ", ...";
  os << "]";
  return os.str();
}

namespace {

Status need_rank4(const Dims& d, const char* name, const char* layout) {
  if (d.rank == 4) return Status::OK();
  return Status::Invalid(std::string(name) + " must have rank 4 " + layout + ", got shape " + dims_string(d));
}

}  // namespace

Status attention_shape(const Dims& q, const Dims& k, const Dims& v, AttentionShape* s) {
  TFA_RETURN_IF_ERROR(need_rank4(q, "query", "[B, T, N, H]"));
  TFA_RETURN_IF_ERROR(need_rank4(k, "key", "[B, S, Nkv, H]"));
  TFA_RETURN_IF_ERROR(need_rank4(v, "value", "[B, S, Nkv, Hv]"));
  s->batch = q.size[0];
  s->seqlen_q = q.size[1];
  s->num_heads = q.size[2];
  s->head_dim = q.size[3];
  s->seqlen_k = k.size[1];
  s->num_heads_kv = k.size[2];
  s->head_dim_v = v.size[3];
  const std::string shapes = "query " + dims_string(q) + ", key " + dims_string(k) + ", value " + dims_string(v);
  if (k.size[0] != s->batch || v.size[0] != s->batch) {
    return Status::Invalid("query, key and value must have the same batch size B, got " + shapes);
  }
  if (v.size[1] != s->seqlen_k || v.size[2] != s->num_heads_kv) {
    return Status::Invalid("value must match key in S and Nkv, got " + shapes);
  }
  if (k.size[3] != s->head_dim) {
    return Status::Invalid("key must have the head dim H of query (" + std::to_string(s->head_dim) + "), got key " +
                           dims_string(k));
  }
  if (s->num_heads_kv == 0 || s->num_heads % s->num_heads_kv != 0) {
    return Status::Invalid("the query heads N must be a multiple of the key/value heads Nkv, got N = " +
                           std::to_string(s->num_heads) + " (query " + dims_string(q) + "), Nkv = " +
                           std::to_string(s->num_heads_kv) + " (key " + dims_string(k) + ")");
  }
  const struct {
    const char* name;
    int64_t value;
  } head_dims[] = {{"H (head dim of query and key)", s->head_dim}, {"Hv (head dim of value)", s->head_dim_v}};
  for (const auto& hd : head_dims) {
    if (hd.value < 1 || hd.value > kMaxHeadDim) {
      return Status::Invalid(std::string(hd.name) + " must be in [1, " + std::to_string(kMaxHeadDim) + "], got " +
                             std::to_string(hd.value));
    }
  }
  return Status::OK();
}

Status attention_mask_dims(const Dims& mask, const AttentionShape& s, int64_t padded[4]) {
  const Dims full{s.batch, s.num_heads, s.seqlen_q, s.seqlen_k};
  const std::string expected = "broadcastable to [B, N, T, S] = " + dims_string(full);
  if (mask.rank > 4) {
    return Status::Invalid("mask must have rank <= 4 (" + expected + "), got shape " + dims_string(mask));
  }
  for (int i = 0; i < 4; ++i) padded[i] = 1;
  for (int i = 0; i < mask.rank; ++i) padded[4 - mask.rank + i] = mask.size[i];
  for (int i = 0; i < 4; ++i) {
    if (padded[i] != 1 && padded[i] != full.size[i]) {
      return Status::Invalid("mask of shape " + dims_string(mask) + " is not " + expected);
    }
  }
  return Status::OK();
}

Status dense_mask_strides(const Dims& mask, const AttentionShape& s, MaskStrides* out) {
  int64_t padded[4];
  TFA_RETURN_IF_ERROR(attention_mask_dims(mask, s, padded));
  int64_t st[4];
  int64_t contiguous = 1;
  for (int i = 3; i >= 0; --i) {
    st[i] = padded[i] == 1 ? 0 : contiguous;
    contiguous *= padded[i];
  }
  *out = MaskStrides{st[0], st[1], st[2], st[3]};
  return Status::OK();
}

Status attention_bwd_inputs(const Dims& o, const Dims& lse, const Dims& d_o, const AttentionShape& s) {
  const Dims o_shape{s.batch, s.seqlen_q, s.num_heads, s.head_dim_v};
  if (!(o == o_shape)) {
    return Status::Invalid("out must have shape [B, T, N, Hv] = " + dims_string(o_shape) + ", got " + dims_string(o));
  }
  if (!(d_o == o_shape)) {
    return Status::Invalid("d_out must have shape [B, T, N, Hv] = " + dims_string(o_shape) + ", got " +
                           dims_string(d_o));
  }
  const Dims lse_shape{s.batch, s.num_heads, s.seqlen_q};
  if (!(lse == lse_shape)) {
    return Status::Invalid("lse must have shape [B, N, T] = " + dims_string(lse_shape) + ", got " + dims_string(lse));
  }
  return Status::OK();
}

}  // namespace core
}  // namespace tf_fastattn
