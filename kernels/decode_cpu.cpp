// CPU implementations of the KV cache ops (schemas in ops.cpp), so that the API and its tests run on
// machines without a GPU, for both formats (int8, and packed INT4 in a uint8 cache, as on CUDA).
// Attention in fp32 torch ops over chunks of the dequantized cache, each sequence over its own
// length (on 2 cores about as fast as fp32 SDPA over an fp16-sized cache at T = 4096, faster
// beyond); the write path row by row through quant_math.h, the arithmetic every kernel shares.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>
#include <torch/types.h>

#include "kvpack/decode_checks.h"
#include "kvpack/quant_math.h"

namespace kvpack {
namespace {

// Packed INT4 bytes (element 2i in the low nibble, stored as q + 8) unpacked to their q, int8, two a
// byte: one pass. The extension is built without OpenMP, so its own loops run on one thread (at::
// parallel_for too: its pragma is compiled out); the conversion and scaling after it are torch's
// vectorized ops, on all threads (a fused loop here was 1.4x slower on 2 cores).
void unpack_int4_rows(const uint8_t* __restrict__ src, int8_t* __restrict__ dst, int64_t bytes) {
  for (int64_t i = 0; i < bytes; ++i) {
    dst[2 * i] = static_cast<int8_t>(int4_from_nibble(src[i] & 0xFu));
    dst[2 * i + 1] = static_cast<int8_t>(int4_from_nibble(src[i] >> 4));
  }
}

// Tokens t0 .. t0 + n - 1 of sequence b, dequantized: fp32 [Hkv, n, D], float(q) * scale as
// dequantize_value (int8) and dequantize_int4_nibble (INT4) give it. per_token: a scale a row (int8),
// a scale a group of the row (INT4); else one a channel ([B, Hkv, D]).
at::Tensor dequantize_chunk(const at::Tensor& x, const at::Tensor& scales, const DecodeShape& s, bool per_token,
                            int64_t b, int64_t t0, int64_t n) {
  const int64_t H = s.kv_heads, D = s.head_dim, G = s.group;
  at::Tensor q = x[b].narrow(1, t0, n);  // int8 [Hkv, n, D]; INT4: unpacked below
  if (G > 0) {
    auto unpacked = at::empty({H, n, D}, x.options().dtype(at::kChar));
    for (int64_t h = 0; h < H; ++h) {
      unpack_int4_rows(q[h].data_ptr<uint8_t>(), unpacked[h].data_ptr<int8_t>(), n * D / 2);
    }
    q = unpacked;
  }
  const auto xf = q.to(at::kFloat);
  if (!per_token) return (xf * scales[b].unsqueeze(1)).contiguous();
  const auto sc = scales[b].narrow(1, t0, n).unsqueeze(-1);  // [Hkv, n, 1] (int8), [Hkv, n, D / G, 1] (INT4)
  if (G == 0) return (xf * sc).contiguous();
  return (xf.view({H, n, D / G, G}) * sc).view({H, n, D});
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& ks, const at::Tensor& vs,
                                const c10::optional<at::Tensor>& lengths, c10::string_view granularity,
                                double sm_scale, int64_t splits, const c10::optional<at::Tensor>& clamped = {}) {
  (void)splits;  // the CPU path does not split
  const auto s = check_decode(q, k, v, ks, vs, lengths, std::string(granularity), /*allow_fp32_q=*/true);
  check_flag(clamped, q);
  const int64_t per_kv = s.q_heads / s.kv_heads;  // query heads a KV head serves
  // Each sequence on its own, over its own (clamped) length L only: its result depends on nothing but
  // its own tokens and L (not on T_max, nor on the batch around it), so a paged cache gathered into a
  // contiguous one gives the same bits. The grouped query heads of a KV head are the rows of one GEMM,
  // so K and V are dequantized once per KV head, never repeated per query head.
  at::Tensor len;
  if (lengths.has_value()) {
    // As the kernel does: lengths clamped to [0, T_max], the flag set where that changed one.
    const auto raw = lengths->to(at::kLong);
    if (clamped.has_value() && ((raw < 1) | (raw > s.max_tokens)).any().item<bool>()) clamped->fill_(1);
    len = raw.clamp(0, s.max_tokens).contiguous();
  }
  auto out = at::zeros({s.batch, s.q_heads, s.head_dim}, q.options().dtype(at::kFloat));
  const auto qf = q.to(at::kFloat);
  // Dequantized in chunks of kChunk tokens, so that a chunk's fp32 K or V stays in the CPU's caches; the
  // chunks' bounds depend on L alone. Values are per token (INT8 "token", INT4 always: its groups).
  constexpr int64_t kChunk = 1024;
  const bool v_per_token = s.per_token || s.group > 0;
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t L = len.defined() ? len.data_ptr<int64_t>()[b] : s.max_tokens;
    if (L == 0) continue;  // attends to nothing: a zero row, as on CUDA
    const auto qb = qf[b].reshape({s.kv_heads, per_kv, s.head_dim});
    auto scores = at::empty({s.kv_heads, per_kv, L}, qf.options());
    for (int64_t t0 = 0; t0 < L; t0 += kChunk) {
      const int64_t n = std::min(kChunk, L - t0);
      scores.narrow(2, t0, n).copy_(at::bmm(qb, dequantize_chunk(k, ks, s, s.per_token, b, t0, n).transpose(1, 2)));
    }
    const auto p = at::softmax(scores.mul_(sm_scale), -1);  // [Hkv, per_kv, L]
    auto acc = at::zeros({s.kv_heads, per_kv, s.head_dim}, qf.options());
    for (int64_t t0 = 0; t0 < L; t0 += kChunk) {
      const int64_t n = std::min(kChunk, L - t0);
      acc.baddbmm_(p.narrow(2, t0, n), dequantize_chunk(v, vs, s, v_per_token, b, t0, n));
    }
    out[b].copy_(acc.reshape({s.q_heads, s.head_dim}));
  }
  return out.to(q.scalar_type());
}

at::Tensor decode_attention_plain_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& ks, const at::Tensor& vs,
                                      const c10::optional<at::Tensor>& lengths, c10::string_view granularity,
                                      double sm_scale, int64_t splits) {
  return decode_attention_cpu(q, k, v, ks, vs, lengths, granularity, sm_scale, splits);
}

at::Tensor decode_attention_flagged_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& ks, const at::Tensor& vs,
                                        const c10::optional<at::Tensor>& lengths, c10::string_view granularity,
                                        double sm_scale, int64_t splits, const at::Tensor& clamped) {
  return decode_attention_cpu(q, k, v, ks, vs, lengths, granularity, sm_scale, splits, clamped);
}

void kv_append_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_scales,
                   const at::Tensor& v_scales, const at::Tensor& lengths, const at::Tensor& arrivals,
                   const at::Tensor& saturated, const at::Tensor& k_new, const at::Tensor& v_new,
                   const c10::optional<at::Tensor>& counts, c10::string_view granularity) {
  const auto s = check_append(k_cache, v_cache, k_scales, v_scales, lengths, arrivals, saturated, k_new, v_new,
                              counts, std::string(granularity));
  const int64_t t_new = k_new.size(2);
  const int64_t D = s.head_dim;
  auto* len = lengths.data_ptr<int32_t>();
  std::vector<int64_t> n(s.batch);
  for (int64_t b = 0; b < s.batch; ++b) {
    n[b] = counts.has_value() ? counts->data_ptr<int32_t>()[b] : t_new;
    TORCH_CHECK_VALUE(n[b] >= 0 && n[b] <= t_new, "kvpack: counts[", b, "] = ", n[b], " is not in [0, ", t_new, "]");
    TORCH_CHECK_VALUE(len[b] >= 0 && len[b] + n[b] <= s.max_tokens, "kvpack: sequence ", b, " holds ", len[b],
                      " tokens; appending ", n[b], " would pass max_tokens = ", s.max_tokens);
  }
  const at::Tensor src[2] = {k_new.to(at::kFloat).contiguous(), v_new.to(at::kFloat).contiguous()};
  void* dst[2] = {k_cache.data_ptr(), v_cache.data_ptr()};
  float* scales[2] = {k_scales.data_ptr<float>(), v_scales.data_ptr<float>()};
  const int64_t G = s.group;  // 0: int8; INT4: channels a scale, values always in groups of a token
  const int64_t rows = s.batch * s.kv_heads * t_new;
  // One row of K or V (r: kv, then head, then the new token j) quantized and stored where the kernels
  // would store it; returns the values that saturated a calibrated channel scale.
  const auto write_row = [&](int64_t r) -> int64_t {
    const int kv = static_cast<int>(r / rows);
    const int64_t head = r % rows / t_new, j = r % t_new, b = head / s.kv_heads;
    if (j >= n[b]) return 0;
    const float* x = src[kv].data_ptr<float>() + (head * t_new + j) * D;
    const int64_t row = head * s.max_tokens + len[b] + j;
    const float* ch = scales[kv] + head * D;  // calibrated channel scales
    int64_t clipped = 0;
    if (G == 0) {
      int8_t* out = static_cast<int8_t*>(dst[kv]) + row * D;
      if (s.per_token) {
        float amax = 0.0f;
        for (int64_t d = 0; d < D; ++d) amax = absmax_combine(amax, x[d]);
        const float scale = scale_from_absmax(amax);
        scales[kv][row] = scale;
        for (int64_t d = 0; d < D; ++d) out[d] = quantize_value(x[d], scale);
      } else {
        for (int64_t d = 0; d < D; ++d) {
          out[d] = quantize_value(x[d], ch[d]);
          clipped += saturates(x[d], ch[d]) ? 1 : 0;
        }
      }
      return clipped;
    }
    uint8_t* out = static_cast<uint8_t*>(dst[kv]) + row * (D / 2);  // element 2i low, 2i + 1 high
    if (kv == 1 || s.per_token) {
      for (int64_t g0 = 0; g0 < D; g0 += G) {
        float amax = 0.0f;
        for (int64_t d = g0; d < g0 + G; ++d) amax = absmax_combine(amax, x[d]);
        const float scale = int4_scale_from_absmax(amax);
        scales[kv][row * (D / G) + g0 / G] = scale;
        for (int64_t d = g0; d < g0 + G; d += 2) {
          out[d / 2] = static_cast<uint8_t>(quantize_int4_nibble(x[d], scale) |
                                            (quantize_int4_nibble(x[d + 1], scale) << 4));
        }
      }
    } else {
      for (int64_t d = 0; d < D; d += 2) {
        out[d / 2] = static_cast<uint8_t>(quantize_int4_nibble(x[d], ch[d]) |
                                          (quantize_int4_nibble(x[d + 1], ch[d + 1]) << 4));
        clipped += (saturates_int4(x[d], ch[d]) ? 1 : 0) + (saturates_int4(x[d + 1], ch[d + 1]) ? 1 : 0);
      }
    }
    return clipped;
  };
  int64_t clipped = 0;
  for (int64_t r = 0; r < 2 * rows; ++r) clipped += write_row(r);
  for (int64_t b = 0; b < s.batch; ++b) len[b] = static_cast<int32_t>(len[b] + n[b]);
  saturated.add_(clipped);
}

}  // namespace

TORCH_LIBRARY_IMPL(kvpack, CPU, m) {
  m.impl("decode_attention", &decode_attention_plain_cpu);
  m.impl("decode_attention_flagged", &decode_attention_flagged_cpu);
  m.impl("kv_append", &kv_append_cpu);
}

}  // namespace kvpack
