// CPU implementations of the KV cache ops (schemas in ops.cpp), so that the API and its tests run on
// machines without a GPU. Attention in fp32 torch ops over chunks of the dequantized cache, each
// sequence over its own length (on 2 cores about as fast as fp32 SDPA over an fp16-sized cache at
// T = 4096, faster beyond); the write path element by element through quant_math.h, the arithmetic
// every kernel shares.
#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>
#include <torch/types.h>

#include "kvpack/decode_checks.h"
#include "kvpack/quant_math.h"

namespace kvpack {
namespace {

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& ks, const at::Tensor& vs,
                                const c10::optional<at::Tensor>& lengths, c10::string_view granularity,
                                double sm_scale, int64_t splits, const c10::optional<at::Tensor>& clamped = {}) {
  (void)splits;  // the CPU path does not split
  const auto s = check_decode(q, k, v, ks, vs, lengths, std::string(granularity), /*allow_fp32_q=*/true);
  check_flag(clamped, q);
  const int64_t group = s.q_heads / s.kv_heads;
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
  // chunks' bounds depend on L alone.
  constexpr int64_t kChunk = 1024;
  const auto dequantized = [&](const at::Tensor& x, const at::Tensor& scales, int64_t b, int64_t t0, int64_t n) {
    // As dequantize_value does: float(q) * scale in fp32; [Hkv, n, D], contiguous.
    const auto xf = x[b].narrow(1, t0, n).to(at::kFloat);
    return (s.per_token ? xf * scales[b].narrow(1, t0, n).unsqueeze(-1) : xf * scales[b].unsqueeze(1)).contiguous();
  };
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t L = len.defined() ? len.data_ptr<int64_t>()[b] : s.max_tokens;
    if (L == 0) continue;  // attends to nothing: a zero row, as on CUDA
    const auto qb = qf[b].reshape({s.kv_heads, group, s.head_dim});
    auto scores = at::empty({s.kv_heads, group, L}, qf.options());
    for (int64_t t0 = 0; t0 < L; t0 += kChunk) {
      const int64_t n = std::min(kChunk, L - t0);
      scores.narrow(2, t0, n).copy_(at::bmm(qb, dequantized(k, ks, b, t0, n).transpose(1, 2)));
    }
    const auto p = at::softmax(scores.mul_(sm_scale), -1);  // [Hkv, group, L]
    auto acc = at::zeros({s.kv_heads, group, s.head_dim}, qf.options());
    for (int64_t t0 = 0; t0 < L; t0 += kChunk) {
      const int64_t n = std::min(kChunk, L - t0);
      acc.baddbmm_(p.narrow(2, t0, n), dequantized(v, vs, b, t0, n));
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
  int8_t* dst[2] = {k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>()};
  float* scales[2] = {k_scales.data_ptr<float>(), v_scales.data_ptr<float>()};
  int64_t clipped = 0;
  for (int kv = 0; kv < 2; ++kv) {
    const float* x = src[kv].data_ptr<float>();
    for (int64_t b = 0; b < s.batch; ++b) {
      for (int64_t h = 0; h < s.kv_heads; ++h) {
        const int64_t head = b * s.kv_heads + h;
        for (int64_t j = 0; j < n[b]; ++j) {
          const float* row = x + (head * t_new + j) * D;
          const int64_t pos = len[b] + j;
          int8_t* out = dst[kv] + (head * s.max_tokens + pos) * D;
          if (s.per_token) {
            float amax = 0.0f;
            for (int64_t d = 0; d < D; ++d) amax = absmax_combine(amax, row[d]);
            const float scale = scale_from_absmax(amax);
            scales[kv][head * s.max_tokens + pos] = scale;
            for (int64_t d = 0; d < D; ++d) out[d] = quantize_value(row[d], scale);
          } else {
            const float* sc = scales[kv] + head * D;
            for (int64_t d = 0; d < D; ++d) {
              out[d] = quantize_value(row[d], sc[d]);
              clipped += saturates(row[d], sc[d]) ? 1 : 0;
            }
          }
        }
      }
    }
  }
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
