// Argument checks of the KV cache ops (decode_attention, kv_append), shared by their CPU
// (kernels/decode_cpu.cpp) and CUDA (kernels/decode_ops.cpp) implementations. The Python wrappers
// (kvpack/decode_attention.py, kvpack/cache.py) check first, naming the argument and the fix; these
// guard direct torch.ops.kvpack calls. Lengths' values are not checked here: on the GPU they live
// in device memory, and the kernels clamp them to [0, T_max] rather than read outside the cache.
#pragma once

#include <string>

#include <torch/types.h>

#if defined(__CUDACC__)
#error "kvpack/decode_checks.h is host code for g++-compiled .cpp files"
#endif

namespace kvpack {
namespace {

struct DecodeShape {
  int64_t batch, q_heads, kv_heads, max_tokens, head_dim;
  bool per_token;
  int64_t group = 0;  // 0: the INT8 cache; else the INT4 cache's group size
};

inline bool parse_cache_granularity(const std::string& g) {
  TORCH_CHECK_VALUE(g == "token" || g == "channel",
                    "kvpack: granularity must be 'token' or 'channel', got '", g, "'");
  return g == "token";
}

inline void check_cache_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype,
                               at::IntArrayRef shape, const at::Tensor& like) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "kvpack: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, "kvpack: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == like.device(), "kvpack: ", name, " is on ", t.device(), " but q is on ",
                    like.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), "kvpack: ", name, " must be contiguous");
}

inline void check_head_dim(int64_t d) {
  TORCH_CHECK_VALUE(d == 64 || d == 128 || d == 256, "kvpack: head dimension D must be 64, 128 or 256, got ", d);
}

// The INT4 cache's group size (the channels a scale covers): even, so that a byte's two nibbles share a
// scale, and dividing D; on CUDA one the kernels are built for (32, 64 or 128), on the CPU any.
inline void check_int4_group(int64_t group, int64_t head_dim, int64_t scales_a_row, const at::Tensor& like) {
  TORCH_CHECK_VALUE(group >= 2 && group % 2 == 0 && group * scales_a_row == head_dim, "kvpack: the INT4 cache takes "
                    "groups of an even number of channels dividing D, got D = ", head_dim, " with ", scales_a_row,
                    " scales a row");
  TORCH_CHECK_VALUE(!like.is_cuda() || group == 32 || group == 64 || group == 128, "kvpack: the CUDA INT4 kernels "
                    "take groups of 32, 64 or 128 channels, got ", group, " (D = ", head_dim, ", ", scales_a_row,
                    " scales a row)");
}

// The cache's format from its dtype: int8, or uint8 for packed INT4, whose group size is
// D / v_scales.size(3). Checks the caches and scales against it; fills s.group.
inline void check_cache_format(DecodeShape& s, const at::Tensor& k, const at::Tensor& v, const at::Tensor& ks,
                               const at::Tensor& vs, const at::Tensor& like) {
  const bool int4 = k.scalar_type() == at::kByte;
  if (!int4) {
    check_cache_tensor(k, "k_cache", at::kChar, {s.batch, s.kv_heads, s.max_tokens, s.head_dim}, like);
    check_cache_tensor(v, "v_cache", at::kChar, {s.batch, s.kv_heads, s.max_tokens, s.head_dim}, like);
    const int64_t last = s.per_token ? s.max_tokens : s.head_dim;
    check_cache_tensor(ks, "k_scales", at::kFloat, {s.batch, s.kv_heads, last}, like);
    check_cache_tensor(vs, "v_scales", at::kFloat, {s.batch, s.kv_heads, last}, like);
    return;
  }
  TORCH_CHECK_VALUE(vs.dim() == 4 && vs.size(3) >= 1 && s.head_dim % vs.size(3) == 0,
                    "kvpack: an INT4 cache's v_scales must be [B, Hkv, T_max, D / group], got ", vs.sizes());
  s.group = s.head_dim / vs.size(3);
  check_int4_group(s.group, s.head_dim, vs.size(3), like);
  check_cache_tensor(k, "k_cache", at::kByte, {s.batch, s.kv_heads, s.max_tokens, s.head_dim / 2}, like);
  check_cache_tensor(v, "v_cache", at::kByte, {s.batch, s.kv_heads, s.max_tokens, s.head_dim / 2}, like);
  const int64_t groups = s.head_dim / s.group;
  if (s.per_token) {
    check_cache_tensor(ks, "k_scales", at::kFloat, {s.batch, s.kv_heads, s.max_tokens, groups}, like);
  } else {
    check_cache_tensor(ks, "k_scales", at::kFloat, {s.batch, s.kv_heads, s.head_dim}, like);
  }
  check_cache_tensor(vs, "v_scales", at::kFloat, {s.batch, s.kv_heads, s.max_tokens, groups}, like);
}

// q [B, Hq, D] fp16/bf16 (fp32 too where allow_fp32_q: the CPU implementation, which computes in
// fp32 anyway), caches int8 [B, Hkv, T_max, D], scales fp32 [B, Hkv, T_max] (token) or [B, Hkv, D]
// (channel), lengths int32 [B] or absent.
// q [B, Hq, D], contiguous, fp16/bf16 (fp32 too where allow_fp32_q: the CPU implementation, which
// computes in fp32 anyway).
inline void check_query(const at::Tensor& q, bool allow_fp32_q) {
  TORCH_CHECK_VALUE(q.dim() == 3, "kvpack: q must be [B, Hq, D], got ", q.sizes());
  TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16 ||
                       (allow_fp32_q && q.scalar_type() == at::kFloat),
                   "kvpack: q must be float16 or bfloat16", allow_fp32_q ? " (or float32 on the CPU)" : "",
                   ", got ", q.scalar_type());
  TORCH_CHECK_VALUE(q.is_contiguous(), "kvpack: q must be contiguous");
}

inline DecodeShape check_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& ks, const at::Tensor& vs,
                                const c10::optional<at::Tensor>& lengths, const std::string& granularity,
                                bool allow_fp32_q = false) {
  const bool per_token = parse_cache_granularity(granularity);
  check_query(q, allow_fp32_q);
  TORCH_CHECK_VALUE(k.dim() == 4, "kvpack: k_cache must be [B, Hkv, T_max, D], got ", k.sizes());
  DecodeShape s{q.size(0), q.size(1), k.size(1), k.size(2), q.size(2), per_token};
  check_head_dim(s.head_dim);
  TORCH_CHECK_VALUE(s.kv_heads >= 1 && s.q_heads % s.kv_heads == 0, "kvpack: Hq = ", s.q_heads,
                    " query heads must be a multiple of Hkv = ", s.kv_heads, " KV heads");
  TORCH_CHECK_VALUE(s.max_tokens >= 1 && s.max_tokens < (int64_t{1} << 31), "kvpack: T_max = ", s.max_tokens,
                    " is out of range");
  check_cache_format(s, k, v, ks, vs, q);
  if (lengths.has_value()) check_cache_tensor(*lengths, "lengths", at::kInt, {s.batch}, q);
  return s;
}

// kv_append: the cache as above (its dtype is the new rows'), k and v [B, Hkv, t_new, D] of one
// floating dtype, counts int32 [B] or absent, lengths and arrivals int32 [B], saturated int64 [].
inline DecodeShape check_append(const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& ks,
                                const at::Tensor& vs, const at::Tensor& lengths, const at::Tensor& arrivals,
                                const at::Tensor& saturated, const at::Tensor& k, const at::Tensor& v,
                                const c10::optional<at::Tensor>& counts, const std::string& granularity) {
  const bool per_token = parse_cache_granularity(granularity);
  TORCH_CHECK_VALUE(kc.dim() == 4, "kvpack: k_cache must be [B, Hkv, T_max, D], got ", kc.sizes());
  // D from the new rows (an INT4 cache holds D / 2 bytes a row).
  TORCH_CHECK_VALUE(k.dim() == 4, "kvpack: k must be [B, Hkv, t_new, D], got ", k.sizes());
  DecodeShape s{kc.size(0), kc.size(1), kc.size(1), kc.size(2), k.size(3), per_token};
  check_head_dim(s.head_dim);
  TORCH_CHECK_VALUE(k.dim() == 4 && k.size(0) == s.batch && k.size(1) == s.kv_heads && k.size(3) == s.head_dim,
                    "kvpack: k must be [B, Hkv, t_new, D] = [", s.batch, ", ", s.kv_heads, ", t_new, ", s.head_dim,
                    "], got ", k.sizes());
  TORCH_CHECK_TYPE(k.scalar_type() == at::kFloat || k.scalar_type() == at::kHalf || k.scalar_type() == at::kBFloat16,
                   "kvpack: k must be float32, float16 or bfloat16, got ", k.scalar_type());
  TORCH_CHECK_VALUE(k.size(2) >= 1 && k.size(2) < (int64_t{1} << 31), "kvpack: k holds ", k.size(2), " new tokens");
  check_cache_tensor(k, "k", k.scalar_type(), k.sizes(), kc);
  check_cache_tensor(v, "v", k.scalar_type(), k.sizes(), kc);
  check_cache_format(s, kc, vc, ks, vs, kc);
  check_cache_tensor(lengths, "lengths", at::kInt, {s.batch}, kc);
  check_cache_tensor(arrivals, "arrivals", at::kInt, {s.batch}, kc);
  check_cache_tensor(saturated, "saturated", at::kLong, {}, kc);
  if (counts.has_value()) check_cache_tensor(*counts, "counts", at::kInt, {s.batch}, kc);
  return s;
}

struct PagedShape {
  int64_t batch, q_heads, kv_heads, num_pages, page_size, head_dim, num_slots, max_pages;
  bool per_token;
  int64_t group = 0;  // 0: int8 pages; else the INT4 pages' group size
};

// The paged cache: pages int8 [num_pages, Hkv, page_size, D] (page_size a multiple of 16 in
// [16, 256]), token scales fp32 [num_pages, Hkv, page_size] or channel scales [num_slots, Hkv, D],
// block_tables int32 [num_slots, max_pages], lengths int32 [num_slots], seq_ids int32 [B] or absent
// (then num_slots == B). `rows` is B, the rows of q (attention) or of k and v (append). INT4 pages
// (uint8, two values a byte): [num_pages, Hkv, page_size, D / 2], v scales (and k scales, "token")
// [num_pages, Hkv, page_size, D / group], k scales per channel [num_slots, Hkv, D] ("channel"); the
// group is D / v_scales.size(3).
inline PagedShape check_paged(int64_t rows, const at::Tensor& kp, const at::Tensor& vp, const at::Tensor& ks,
                              const at::Tensor& vs, const at::Tensor& bt, const at::Tensor& lengths,
                              const c10::optional<at::Tensor>& seq_ids, const std::string& granularity,
                              const at::Tensor& like) {
  const bool per_token = parse_cache_granularity(granularity);
  TORCH_CHECK_VALUE(kp.dim() == 4, "kvpack: k_pages must be [num_pages, Hkv, page_size, D], got ", kp.sizes());
  TORCH_CHECK_VALUE(bt.dim() == 2, "kvpack: block_tables must be [num_slots, max_pages], got ", bt.sizes());
  const bool int4 = kp.scalar_type() == at::kByte;
  PagedShape s{rows, 0, kp.size(1), kp.size(0), kp.size(2), int4 ? 2 * kp.size(3) : kp.size(3), bt.size(0),
               bt.size(1), per_token};
  check_head_dim(s.head_dim);
  TORCH_CHECK_VALUE(s.page_size >= 16 && s.page_size <= 256 && s.page_size % 16 == 0, "kvpack: page_size = ",
                    s.page_size, " must be a multiple of 16 in [16, 256]");
  TORCH_CHECK_VALUE(s.num_pages >= 1 && s.num_slots >= 1 && s.max_pages >= 1 &&
                        s.max_pages * s.page_size < (int64_t{1} << 31),
                    "kvpack: num_pages, num_slots and max_pages must be positive (and max_pages * page_size < 2^31)");
  // kvpack.paged.check_pool_rows: the kernels address a token row of the pool in 32 bits
  TORCH_CHECK_VALUE(s.num_pages * s.kv_heads * s.page_size <= (int64_t{1} << 32), "kvpack: the page pool holds ",
                    "num_pages * Hkv * page_size = ", s.num_pages * s.kv_heads * s.page_size,
                    " token rows; the paged kernels address at most 2^32: use fewer pages");
  if (int4) {
    TORCH_CHECK_VALUE(vs.dim() == 4 && vs.size(3) >= 1 && s.head_dim % vs.size(3) == 0,
                      "kvpack: INT4 pages' v_scales must be [num_pages, Hkv, page_size, D / group], got ", vs.sizes());
    s.group = s.head_dim / vs.size(3);
    check_int4_group(s.group, s.head_dim, vs.size(3), like);
    const int64_t groups = s.head_dim / s.group;
    check_cache_tensor(kp, "k_pages", at::kByte, {s.num_pages, s.kv_heads, s.page_size, s.head_dim / 2}, like);
    check_cache_tensor(vp, "v_pages", at::kByte, {s.num_pages, s.kv_heads, s.page_size, s.head_dim / 2}, like);
    if (per_token) {
      check_cache_tensor(ks, "k_scales", at::kFloat, {s.num_pages, s.kv_heads, s.page_size, groups}, like);
    } else {
      check_cache_tensor(ks, "k_scales", at::kFloat, {s.num_slots, s.kv_heads, s.head_dim}, like);
    }
    check_cache_tensor(vs, "v_scales", at::kFloat, {s.num_pages, s.kv_heads, s.page_size, groups}, like);
  } else {
    check_cache_tensor(kp, "k_pages", at::kChar, {s.num_pages, s.kv_heads, s.page_size, s.head_dim}, like);
    check_cache_tensor(vp, "v_pages", at::kChar, {s.num_pages, s.kv_heads, s.page_size, s.head_dim}, like);
    if (per_token) {
      check_cache_tensor(ks, "k_scales", at::kFloat, {s.num_pages, s.kv_heads, s.page_size}, like);
      check_cache_tensor(vs, "v_scales", at::kFloat, {s.num_pages, s.kv_heads, s.page_size}, like);
    } else {
      check_cache_tensor(ks, "k_scales", at::kFloat, {s.num_slots, s.kv_heads, s.head_dim}, like);
      check_cache_tensor(vs, "v_scales", at::kFloat, {s.num_slots, s.kv_heads, s.head_dim}, like);
    }
  }
  check_cache_tensor(bt, "block_tables", at::kInt, {s.num_slots, s.max_pages}, like);
  check_cache_tensor(lengths, "lengths", at::kInt, {s.num_slots}, like);
  if (seq_ids.has_value()) {
    check_cache_tensor(*seq_ids, "seq_ids", at::kInt, {rows}, like);
  } else {
    TORCH_CHECK_VALUE(s.num_slots == rows, "kvpack: without seq_ids, block_tables must hold one row per sequence (",
                      rows, "), got ", s.num_slots);
  }
  return s;
}

// paged_decode_attention: q as check_query has it, the pages as check_paged has them, q's D the pages'
// and Hq a multiple of Hkv; q_heads filled in.
inline PagedShape check_paged_decode(const at::Tensor& q, const at::Tensor& kp, const at::Tensor& vp,
                                     const at::Tensor& ks, const at::Tensor& vs, const at::Tensor& bt,
                                     const at::Tensor& lengths, const c10::optional<at::Tensor>& seq_ids,
                                     const std::string& granularity, bool allow_fp32_q = false) {
  check_query(q, allow_fp32_q);
  auto s = check_paged(q.size(0), kp, vp, ks, vs, bt, lengths, seq_ids, granularity, q);
  s.q_heads = q.size(1);
  TORCH_CHECK_VALUE(q.size(2) == s.head_dim, "kvpack: q has head dimension ", q.size(2), " but the pages ", s.head_dim);
  TORCH_CHECK_VALUE(s.q_heads % s.kv_heads == 0, "kvpack: Hq = ", s.q_heads,
                    " query heads must be a multiple of Hkv = ", s.kv_heads, " KV heads");
  return s;
}

// paged_kv_append: the pages as check_paged has them, k and v [B, Hkv, t_new, D] of one floating dtype,
// arrivals int32 [num_slots], saturated int64 [].
inline PagedShape check_paged_append(const at::Tensor& kp, const at::Tensor& vp, const at::Tensor& ks,
                                     const at::Tensor& vs, const at::Tensor& bt, const at::Tensor& lengths,
                                     const at::Tensor& arrivals, const at::Tensor& saturated, const at::Tensor& k_new,
                                     const at::Tensor& v_new, const c10::optional<at::Tensor>& seq_ids,
                                     const std::string& granularity) {
  TORCH_CHECK_VALUE(k_new.dim() == 4, "kvpack: k must be [B, Hkv, t_new, D], got ", k_new.sizes());
  const auto s = check_paged(k_new.size(0), kp, vp, ks, vs, bt, lengths, seq_ids, granularity, kp);
  TORCH_CHECK_VALUE(k_new.size(1) == s.kv_heads && k_new.size(3) == s.head_dim, "kvpack: k must be [B, Hkv = ",
                    s.kv_heads, ", t_new, D = ", s.head_dim, "], got ", k_new.sizes());
  TORCH_CHECK_TYPE(k_new.scalar_type() == at::kFloat || k_new.scalar_type() == at::kHalf ||
                       k_new.scalar_type() == at::kBFloat16,
                   "kvpack: k must be float32, float16 or bfloat16, got ", k_new.scalar_type());
  TORCH_CHECK_VALUE(k_new.size(2) >= 1 && k_new.size(2) < (int64_t{1} << 31), "kvpack: k holds ", k_new.size(2),
                    " new tokens");
  check_cache_tensor(k_new, "k", k_new.scalar_type(), k_new.sizes(), kp);
  check_cache_tensor(v_new, "v", k_new.scalar_type(), k_new.sizes(), kp);
  check_cache_tensor(arrivals, "arrivals", at::kInt, {s.num_slots}, kp);
  check_cache_tensor(saturated, "saturated", at::kLong, {}, kp);
  return s;
}

inline void check_flag(const c10::optional<at::Tensor>& clamped, const at::Tensor& like) {
  if (clamped.has_value()) check_cache_tensor(*clamped, "clamped", at::kInt, {1}, like);
}

}  // namespace
}  // namespace kvpack
