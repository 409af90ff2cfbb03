// Schemas of every kvpack op, declared once. Each backend registers its implementation in its own
// file: cpu_baseline.cpp (CPU, variant "cpu_serial") and the .cu files (CUDA, the GPU variants).
//
//   compute_scales(x[T, D], granularity)            -> fp32 scales: [D] per channel, [T] per token
//   quantize(x, scales, variant, granularity)       -> int8 [T, D]
//   dequantize(q, scales, variant, granularity, dtype) -> dtype [T, D]
//   quantize_fused(x, variant, granularity)         -> (int8 [T, D], fp32 scales)
//   fast_tuning(probe)                              -> JSON: what "fast" chose on probe's device (CUDA)
//
// The INT8 KV cache (layout in kernels/include/kvpack/decode_launchers.h; CPU: decode_cpu.cpp,
// CUDA: decode_ops.cpp):
//   decode_attention(q [B, Hq, D], k_cache, v_cache, k_scales, v_scales, lengths?, granularity,
//                    sm_scale, splits)                -> [B, Hq, D] in q's dtype (splits 0: planned)
//   decode_attention_flagged(..., clamped!)           -> the same, clamped[0] = 1 where a length was clamped
//   paged_decode_attention(q, k_pages, v_pages, k_scales, v_scales, block_tables, lengths, seq_ids?,
//                          granularity, sm_scale, splits) -> the same over a paged cache
//   paged_decode_attention_flagged(..., clamped!)     -> the same, flagging clamped lengths, pages, slots
//   paged_kv_append(k_pages!, v_pages!, k_scales!, v_scales!, block_tables, lengths!, arrivals!,
//                   saturated!, k, v, seq_ids?, granularity) -> quantizes new rows into their pages (CUDA)
//   decode_splits(q, k_cache, granularity)            -> the split count a decode step plans (CUDA)
//   kv_append(k_cache!, v_cache!, k_scales!, v_scales!, lengths!, arrivals!, saturated!, k, v,
//             counts?, granularity)                   -> quantizes new rows into the cache
#include <torch/library.h>

TORCH_LIBRARY(kvpack, m) {
  m.def("compute_scales(Tensor x, str granularity) -> Tensor");
  m.def("quantize(Tensor x, Tensor scales, str variant, str granularity) -> Tensor");
  m.def("dequantize(Tensor q, Tensor scales, str variant, str granularity, ScalarType dtype) -> Tensor");
  m.def("quantize_fused(Tensor x, str variant, str granularity) -> (Tensor, Tensor)");
  m.def("fast_tuning(Tensor probe) -> str");
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor k_scales, Tensor v_scales, "
      "Tensor? lengths, str granularity, float sm_scale, int splits) -> Tensor");
  // The same, also setting clamped[0] = 1 where a length was clamped. A separate op rather than an
  // optional mutable argument: torch.compile (2.11) fails to lower an op that returns a tensor and
  // mutates an optional one, and the flagless op must stay compilable (kvpack.hf compiles it).
  m.def(
      "decode_attention_flagged(Tensor q, Tensor k_cache, Tensor v_cache, Tensor k_scales, Tensor v_scales, "
      "Tensor? lengths, str granularity, float sm_scale, int splits, Tensor(a!) clamped) -> Tensor");
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_pages, Tensor v_pages, Tensor k_scales, Tensor v_scales, "
      "Tensor block_tables, Tensor lengths, Tensor? seq_ids, str granularity, float sm_scale, int splits) -> Tensor");
  m.def(
      "paged_decode_attention_flagged(Tensor q, Tensor k_pages, Tensor v_pages, Tensor k_scales, Tensor v_scales, "
      "Tensor block_tables, Tensor lengths, Tensor? seq_ids, str granularity, float sm_scale, int splits, "
      "Tensor(a!) clamped) -> Tensor");
  m.def(
      "paged_kv_append(Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor(c!) k_scales, Tensor(d!) v_scales, "
      "Tensor block_tables, Tensor(e!) lengths, Tensor(f!) arrivals, Tensor(g!) saturated, Tensor k, Tensor v, "
      "Tensor? seq_ids, str granularity) -> ()");
  m.def("decode_splits(Tensor q, Tensor k_cache, str granularity) -> int");
  m.def(
      "kv_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) k_scales, Tensor(d!) v_scales, "
      "Tensor(e!) lengths, Tensor(f!) arrivals, Tensor(g!) saturated, Tensor k, Tensor v, Tensor? counts, "
      "str granularity) -> ()");
}
