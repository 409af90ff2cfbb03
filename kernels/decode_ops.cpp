// CUDA implementations of the KV cache ops (schemas in ops.cpp): checks, device guard, current
// stream, workspace, then the launchers of kernels/decode_attention.cu. Host code compiled by g++,
// as kernels/cuda_ops.cpp is (it says why); kvpack/build.py adds it together with the .cu files.
//
// No host synchronisation and no allocation whose size depends on data: the split count and the
// workspace depend on the shapes alone, so a decode step (append, attention) can be captured in a
// CUDA graph and replayed.
#include <cstdint>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "kvpack/decode_checks.h"
#include "kvpack/decode_launchers.h"

namespace kvpack {
namespace {

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), "kvpack: ", name, " is on ", t.device(), "; this implementation needs CUDA tensors");
}

// The split kernel's workspace, one allocation: partial outputs [B, Hq, splits, D], then the parts'
// (max, sum) [B, Hq, splits, 2] (D floats a row keep them 16-byte aligned).
struct Workspace {
  at::Tensor storage;
  float* partial_out;
  float* partial_stats;
};

Workspace decode_workspace(const at::Tensor& q, int64_t rows, int64_t head_dim) {
  Workspace w;
  w.storage = at::empty({rows * (head_dim + 2)}, q.options().dtype(at::kFloat));
  w.partial_out = w.storage.mutable_data_ptr<float>();
  w.partial_stats = w.partial_out + rows * head_dim;
  return w;
}

// The split kernel reads the query 16 bytes at a time: a query that starts off a 16-byte boundary
// (a contiguous view at an odd offset; never a fresh tensor) is copied to one that does not.
at::Tensor aligned_query(const at::Tensor& q) {
  return reinterpret_cast<uintptr_t>(q.const_data_ptr()) % 16 == 0 ? q : q.clone();
}

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& ks, const at::Tensor& vs,
                                 const c10::optional<at::Tensor>& lengths, c10::string_view granularity,
                                 double sm_scale, int64_t splits, const c10::optional<at::Tensor>& clamped = {}) {
  const auto s = check_decode(q, k, v, ks, vs, lengths, std::string(granularity));
  check_flag(clamped, q);
  check_cuda(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  if (splits <= 0) {
    splits = cuda::decode_splits(s.batch, s.q_heads, s.kv_heads, s.max_tokens, static_cast<int>(s.head_dim),
                                 q.scalar_type(), s.per_token, /*paged=*/false, static_cast<int>(s.group));
  }
  TORCH_CHECK_VALUE(splits <= s.max_tokens && splits <= 4096, "kvpack: splits = ", splits,
                    " must be at most T_max = ", s.max_tokens, " and at most 4096");
  auto out = at::empty_like(q);
  const auto ws = decode_workspace(q, s.batch * s.q_heads * splits, s.head_dim);
  const at::Tensor qa = aligned_query(q);
  cuda::DecodeArgs args{qa.const_data_ptr(),
                        static_cast<const int8_t*>(k.const_data_ptr()),  // INT4: packed bytes
                        static_cast<const int8_t*>(v.const_data_ptr()),
                        ks.const_data_ptr<float>(),
                        vs.const_data_ptr<float>(),
                        lengths.has_value() ? lengths->const_data_ptr<int32_t>() : nullptr,
                        out.mutable_data_ptr(),
                        ws.partial_out,
                        ws.partial_stats,
                        s.batch,
                        s.q_heads,
                        s.kv_heads,
                        s.max_tokens,
                        static_cast<int>(s.head_dim),
                        static_cast<int>(splits),
                        static_cast<float>(sm_scale),
                        s.per_token,
                        q.scalar_type(),
                        c10::cuda::getCurrentCUDAStream().stream()};
  args.clamped = clamped.has_value() ? clamped->mutable_data_ptr<int32_t>() : nullptr;
  args.group = static_cast<int>(s.group);
  cuda::decode_attention(args);
  return out;
}

// The paged fields of DecodeArgs or AppendArgs: the block tables, the row -> slot map and the sizes.
template <typename Args>
void set_paged(Args& args, const at::Tensor& bt, const c10::optional<at::Tensor>& seq_ids, const PagedShape& s) {
  args.block_tables = bt.const_data_ptr<int32_t>();
  args.seq_ids = seq_ids.has_value() ? seq_ids->const_data_ptr<int32_t>() : nullptr;
  args.num_pages = s.num_pages;
  args.max_pages = s.max_pages;
  args.num_slots = s.num_slots;
  args.page_size = static_cast<int>(s.page_size);
}

// The paged cache: the same kernels, reading each tile from the page its block table names.
at::Tensor paged_decode_attention_cuda(const at::Tensor& q, const at::Tensor& kp, const at::Tensor& vp,
                                       const at::Tensor& ks, const at::Tensor& vs, const at::Tensor& bt,
                                       const at::Tensor& lengths, const c10::optional<at::Tensor>& seq_ids,
                                       c10::string_view granularity, double sm_scale, int64_t splits,
                                       const c10::optional<at::Tensor>& clamped = {}) {
  const auto s = check_paged_decode(q, kp, vp, ks, vs, bt, lengths, seq_ids, std::string(granularity));
  check_flag(clamped, q);
  check_cuda(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t max_tokens = s.max_pages * s.page_size;
  if (splits <= 0) {
    splits = cuda::decode_splits(s.batch, s.q_heads, s.kv_heads, max_tokens, static_cast<int>(s.head_dim),
                                 q.scalar_type(), s.per_token, /*paged=*/true, static_cast<int>(s.group));
  }
  TORCH_CHECK_VALUE(splits <= max_tokens && splits <= 4096, "kvpack: splits = ", splits,
                    " must be at most max_pages * page_size = ", max_tokens, " and at most 4096");
  auto out = at::empty_like(q);
  const auto ws = decode_workspace(q, s.batch * s.q_heads * splits, s.head_dim);
  const at::Tensor qa = aligned_query(q);
  cuda::DecodeArgs args{};
  args.q = qa.const_data_ptr();
  args.k = static_cast<const int8_t*>(kp.const_data_ptr());  // INT4: packed bytes
  args.v = static_cast<const int8_t*>(vp.const_data_ptr());
  args.k_scales = ks.const_data_ptr<float>();
  args.v_scales = vs.const_data_ptr<float>();
  args.lengths = lengths.const_data_ptr<int32_t>();
  args.out = out.mutable_data_ptr();
  args.partial_out = ws.partial_out;
  args.partial_stats = ws.partial_stats;
  args.batch = s.batch;
  args.q_heads = s.q_heads;
  args.kv_heads = s.kv_heads;
  args.max_tokens = max_tokens;
  args.head_dim = static_cast<int>(s.head_dim);
  args.splits = static_cast<int>(splits);
  args.sm_scale = static_cast<float>(sm_scale);
  args.per_token = s.per_token;
  args.dtype = q.scalar_type();
  args.stream = c10::cuda::getCurrentCUDAStream().stream();
  args.clamped = clamped.has_value() ? clamped->mutable_data_ptr<int32_t>() : nullptr;
  args.group = static_cast<int>(s.group);
  set_paged(args, bt, seq_ids, s);
  cuda::decode_attention(args);
  return out;
}

at::Tensor decode_attention_flagged_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& ks, const at::Tensor& vs,
                                         const c10::optional<at::Tensor>& lengths, c10::string_view granularity,
                                         double sm_scale, int64_t splits, const at::Tensor& clamped) {
  return decode_attention_cuda(q, k, v, ks, vs, lengths, granularity, sm_scale, splits, clamped);
}

at::Tensor paged_decode_attention_flagged_cuda(const at::Tensor& q, const at::Tensor& kp, const at::Tensor& vp,
                                               const at::Tensor& ks, const at::Tensor& vs, const at::Tensor& bt,
                                               const at::Tensor& lengths, const c10::optional<at::Tensor>& seq_ids,
                                               c10::string_view granularity, double sm_scale, int64_t splits,
                                               const at::Tensor& clamped) {
  return paged_decode_attention_cuda(q, kp, vp, ks, vs, bt, lengths, seq_ids, granularity, sm_scale, splits, clamped);
}

at::Tensor decode_attention_plain_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& ks, const at::Tensor& vs,
                                       const c10::optional<at::Tensor>& lengths, c10::string_view granularity,
                                       double sm_scale, int64_t splits) {
  return decode_attention_cuda(q, k, v, ks, vs, lengths, granularity, sm_scale, splits);
}

at::Tensor paged_decode_attention_plain_cuda(const at::Tensor& q, const at::Tensor& kp, const at::Tensor& vp,
                                             const at::Tensor& ks, const at::Tensor& vs, const at::Tensor& bt,
                                             const at::Tensor& lengths, const c10::optional<at::Tensor>& seq_ids,
                                             c10::string_view granularity, double sm_scale, int64_t splits) {
  return paged_decode_attention_cuda(q, kp, vp, ks, vs, bt, lengths, seq_ids, granularity, sm_scale, splits);
}

void paged_kv_append_cuda(const at::Tensor& kp, const at::Tensor& vp, const at::Tensor& ks, const at::Tensor& vs,
                          const at::Tensor& bt, const at::Tensor& lengths, const at::Tensor& arrivals,
                          const at::Tensor& saturated, const at::Tensor& k_new, const at::Tensor& v_new,
                          const c10::optional<at::Tensor>& seq_ids, c10::string_view granularity) {
  const auto s = check_paged_append(kp, vp, ks, vs, bt, lengths, arrivals, saturated, k_new, v_new, seq_ids,
                                    std::string(granularity));
  check_cuda(kp, "k_pages");
  const c10::cuda::CUDAGuard guard(kp.device());
  cuda::AppendArgs args{};
  args.k = k_new.const_data_ptr();
  args.v = v_new.const_data_ptr();
  args.counts = nullptr;
  args.k_cache = static_cast<int8_t*>(kp.mutable_data_ptr());  // INT4: packed bytes
  args.v_cache = static_cast<int8_t*>(vp.mutable_data_ptr());
  args.k_scales = ks.mutable_data_ptr<float>();
  args.v_scales = vs.mutable_data_ptr<float>();
  args.lengths = lengths.mutable_data_ptr<int32_t>();
  args.arrivals = arrivals.mutable_data_ptr<int32_t>();
  args.saturated = reinterpret_cast<unsigned long long*>(saturated.mutable_data_ptr<int64_t>());
  args.batch = s.batch;
  args.kv_heads = s.kv_heads;
  args.new_tokens = k_new.size(2);
  args.max_tokens = s.max_pages * s.page_size;
  args.head_dim = static_cast<int>(s.head_dim);
  args.per_token = s.per_token;
  args.dtype = k_new.scalar_type();
  args.stream = c10::cuda::getCurrentCUDAStream().stream();
  args.group = static_cast<int>(s.group);
  set_paged(args, bt, seq_ids, s);
  cuda::kv_append(args);
}

int64_t decode_splits_cuda(const at::Tensor& q, const at::Tensor& k_cache, c10::string_view granularity) {
  check_cuda(q, "q");
  TORCH_CHECK_VALUE(q.dim() == 3 && k_cache.dim() == 4, "kvpack: q must be [B, Hq, D] and k_cache [B, Hkv, T_max, D]");
  const c10::cuda::CUDAGuard guard(q.device());
  // An INT4 (uint8) cache is planned as the default group of 32 (decode_attention plans its own group).
  const int group = k_cache.scalar_type() == at::kByte ? 32 : 0;
  return cuda::decode_splits(q.size(0), q.size(1), k_cache.size(1), k_cache.size(2), static_cast<int>(q.size(2)),
                             q.scalar_type(), parse_cache_granularity(std::string(granularity)), false, group);
}

void kv_append_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_scales,
                    const at::Tensor& v_scales, const at::Tensor& lengths, const at::Tensor& arrivals,
                    const at::Tensor& saturated, const at::Tensor& k_new, const at::Tensor& v_new,
                    const c10::optional<at::Tensor>& counts, c10::string_view granularity) {
  const auto s = check_append(k_cache, v_cache, k_scales, v_scales, lengths, arrivals, saturated, k_new, v_new,
                              counts, std::string(granularity));
  check_cuda(k_cache, "k_cache");
  const c10::cuda::CUDAGuard guard(k_cache.device());
  cuda::AppendArgs args{k_new.const_data_ptr(),
                        v_new.const_data_ptr(),
                        counts.has_value() ? counts->const_data_ptr<int32_t>() : nullptr,
                        static_cast<int8_t*>(k_cache.mutable_data_ptr()),  // INT4: packed bytes
                        static_cast<int8_t*>(v_cache.mutable_data_ptr()),
                        k_scales.mutable_data_ptr<float>(),
                        v_scales.mutable_data_ptr<float>(),
                        lengths.mutable_data_ptr<int32_t>(),
                        arrivals.mutable_data_ptr<int32_t>(),
                        reinterpret_cast<unsigned long long*>(saturated.mutable_data_ptr<int64_t>()),
                        s.batch,
                        s.kv_heads,
                        k_new.size(2),
                        s.max_tokens,
                        static_cast<int>(s.head_dim),
                        s.per_token,
                        k_new.scalar_type(),
                        c10::cuda::getCurrentCUDAStream().stream()};
  args.group = static_cast<int>(s.group);
  cuda::kv_append(args);
}

}  // namespace

TORCH_LIBRARY_IMPL(kvpack, CUDA, m) {
  m.impl("decode_attention", &decode_attention_plain_cuda);
  m.impl("decode_attention_flagged", &decode_attention_flagged_cuda);
  m.impl("decode_splits", &decode_splits_cuda);
  m.impl("kv_append", &kv_append_cuda);
  m.impl("paged_decode_attention", &paged_decode_attention_plain_cuda);
  m.impl("paged_decode_attention_flagged", &paged_decode_attention_flagged_cuda);
  m.impl("paged_kv_append", &paged_kv_append_cuda);
}

// Tests only (no tensor, so no dispatch key): turn the split kernel's last-block merge off (false) or
// on again; returns the previous setting. Built with the CUDA half only.
TORCH_LIBRARY_FRAGMENT(kvpack, m) {
  m.def("_set_fused_merge(bool enabled) -> bool",
        [](bool enabled) -> bool { return cuda::set_fused_merge(enabled); });
}

}  // namespace kvpack
