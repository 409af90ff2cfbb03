// CPU implementations of the KV cache ops (schemas in ops.cpp), so that the API and its tests run on
// machines without a GPU, for both formats (int8, and packed INT4 in a uint8 cache, as on CUDA) and
// both layouts (contiguous, paged). Attention in fp32 torch ops over chunks of the cache, each sequence
// over its own length (on 2 cores faster than fp32 SDPA over the repeated fp32 cache:
// tools/lab/cpu_decode.py); the write path row by row through quant_math.h, the arithmetic every kernel
// shares.
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

// One INT4 chunk of a sequence's K or V as stored: `raw` packed uint8 [Hkv, n, D / 2] (each head's n
// rows contiguous) and its scales, per token [Hkv, n, D / G] (groups of G channels) or per channel
// [Hkv, D] (keys). Dequantized: fp32 [Hkv, n, D], float(q) * scale as dequantize_value gives it.
at::Tensor dequantize_chunk(const at::Tensor& raw, const at::Tensor& scales, bool per_token, const DecodeShape& s) {
  const int64_t H = s.kv_heads, D = s.head_dim, G = s.group, n = raw.size(1);
  auto q = at::empty({H, n, D}, raw.options().dtype(at::kChar));
  for (int64_t h = 0; h < H; ++h) unpack_int4_rows(raw[h].data_ptr<uint8_t>(), q[h].data_ptr<int8_t>(), n * D / 2);
  const auto xf = q.to(at::kFloat);
  if (!per_token) return (xf * scales.unsqueeze(1)).contiguous();
  return (xf.view({H, n, D / G, G}) * scales.unsqueeze(-1)).view({H, n, D});
}

// Attention of q's rows, each over its own length lens[b] (already clamped; 0: a zero row, as on CUDA),
// with `source` giving the stored chunks: source.rows(kv, b, t0, n), source.token_scales(kv, b, t0, n)
// and source.channel_scales(kv, b) (kv: 0 keys, 1 values). Each sequence on its own, over its own
// length only: its result depends on nothing but its own tokens and L (not on T_max, the batch around
// it, or where its rows are stored), so the paged and the contiguous cache give the same bits. The
// grouped query heads of a KV head are the rows of one GEMM, so K and V are dequantized once per KV
// head, never repeated per query head. fp32 [B, Hq, D].
template <typename Source>
at::Tensor attend_cpu(const at::Tensor& q, const DecodeShape& s, const std::vector<int64_t>& lens, double sm_scale,
                      const Source& source) {
  const int64_t per_kv = s.q_heads / s.kv_heads;  // query heads a KV head serves
  auto out = at::zeros({s.batch, s.q_heads, s.head_dim}, q.options().dtype(at::kFloat));
  const auto qf = q.to(at::kFloat);
  // In chunks of kChunk tokens, so that a chunk's fp32 K or V stays in the CPU's caches; the chunks'
  // bounds depend on L alone. INT8 folds its scales as the CUDA kernel does, so that K and V are only
  // converted (one pass, not two): a token's K scale multiplies its scores, a token's V scale its
  // probabilities; channel scales multiply the query (K) and the output (V) once. INT4 dequantizes each
  // chunk with its group scales (per token, or per channel for its keys).
  constexpr int64_t kChunk = 1024;
  const bool fold = s.group == 0;
  const bool token[2] = {s.per_token, s.per_token || s.group > 0};
  const auto values = [&](int kv, int64_t b, int64_t t0, int64_t n) {  // fp32 [Hkv, n, D]
    if (fold) return source.rows(kv, b, t0, n).to(at::kFloat);
    return dequantize_chunk(source.rows(kv, b, t0, n),
                            token[kv] ? source.token_scales(kv, b, t0, n) : source.channel_scales(kv, b), token[kv], s);
  };
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t L = lens[b];
    if (L == 0) continue;
    auto qb = qf[b].reshape({s.kv_heads, per_kv, s.head_dim});
    if (fold && !s.per_token) qb = qb * source.channel_scales(0, b).unsqueeze(1);
    auto scores = at::empty({s.kv_heads, per_kv, L}, qf.options());
    for (int64_t t0 = 0; t0 < L; t0 += kChunk) {
      const int64_t n = std::min(kChunk, L - t0);
      auto dst = scores.narrow(2, t0, n);
      const auto dots = at::bmm(qb, values(0, b, t0, n).transpose(1, 2));  // [Hkv, per_kv, n]
      if (fold && s.per_token) {
        at::mul_out(dst, dots, source.token_scales(0, b, t0, n).unsqueeze(1));
      } else {
        dst.copy_(dots);
      }
    }
    const auto p = at::softmax(scores.mul_(sm_scale), -1);  // [Hkv, per_kv, L]
    auto acc = at::zeros({s.kv_heads, per_kv, s.head_dim}, qf.options());
    for (int64_t t0 = 0; t0 < L; t0 += kChunk) {
      const int64_t n = std::min(kChunk, L - t0);
      auto pc = p.narrow(2, t0, n);
      if (fold && s.per_token) pc = pc * source.token_scales(1, b, t0, n).unsqueeze(1);
      acc.baddbmm_(pc, values(1, b, t0, n));
    }
    if (fold && !s.per_token) acc.mul_(source.channel_scales(1, b).unsqueeze(1));
    out[b].copy_(acc.reshape({s.q_heads, s.head_dim}));
  }
  return out;
}

// The contiguous cache [B, Hkv, T_max, D(/2)]: chunks are views.
struct ContiguousSource {
  const at::Tensor* cache[2];
  const at::Tensor* scales[2];
  at::Tensor rows(int kv, int64_t b, int64_t t0, int64_t n) const { return (*cache[kv])[b].narrow(1, t0, n); }
  at::Tensor token_scales(int kv, int64_t b, int64_t t0, int64_t n) const {
    return (*scales[kv])[b].narrow(1, t0, n);
  }
  at::Tensor channel_scales(int kv, int64_t b) const { return (*scales[kv])[b]; }
};

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& ks, const at::Tensor& vs,
                                const c10::optional<at::Tensor>& lengths, c10::string_view granularity,
                                double sm_scale, int64_t splits, const c10::optional<at::Tensor>& clamped = {}) {
  (void)splits;  // the CPU path does not split
  const auto s = check_decode(q, k, v, ks, vs, lengths, std::string(granularity), /*allow_fp32_q=*/true);
  check_flag(clamped, q);
  // As the kernel does: lengths clamped to [0, T_max], the flag set where that changed one.
  std::vector<int64_t> lens(s.batch, s.max_tokens);
  bool flag = false;
  for (int64_t b = 0; lengths.has_value() && b < s.batch; ++b) {
    const int64_t raw = lengths->data_ptr<int32_t>()[b];
    flag |= raw < 1 || raw > s.max_tokens;
    lens[b] = std::clamp<int64_t>(raw, 0, s.max_tokens);
  }
  if (flag && clamped.has_value()) clamped->fill_(1);
  const ContiguousSource source{{&k, &v}, {&ks, &vs}};
  return attend_cpu(q, s, lens, sm_scale, source).to(q.scalar_type());
}

// The paged cache: pages [num_pages, Hkv, page_size, D(/2)], token scales in the pages' layout,
// channel scales [num_slots, Hkv, D]. A chunk is gathered a (page, head) block at a time from the pages
// its block-table row names (each id clamped to the pool, as the kernels clamp it), head-major, so the
// gather lands in [Hkv, pages * page_size, ...]; the chunk is a view of that.
struct PagedSource {
  const at::Tensor* pages[2];
  const at::Tensor* scales[2];
  const int32_t* table;  // block_tables, [num_slots, max_pages]
  const std::vector<int64_t>& slots;
  int64_t kv_heads, page_size, num_pages, max_pages;
  int64_t first_page(int64_t t0) const { return t0 / page_size; }
  int64_t page_count(int64_t t0, int64_t n) const { return (t0 + n - 1) / page_size - first_page(t0) + 1; }
  at::Tensor index(int64_t b, int64_t t0, int64_t n) const {  // [Hkv * pages]: (page, head) blocks, head-major
    const int64_t j0 = first_page(t0), m = page_count(t0, n);
    auto idx = at::empty({kv_heads * m}, at::kLong);
    int64_t* out = idx.data_ptr<int64_t>();
    const int32_t* row = table + slots[b] * max_pages;
    for (int64_t j = 0; j < m; ++j) {
      const int64_t page = std::clamp<int64_t>(row[j0 + j], 0, num_pages - 1);
      for (int64_t h = 0; h < kv_heads; ++h) out[h * m + j] = page * kv_heads + h;
    }
    return idx;
  }
  // x [num_pages, Hkv, page_size, w...] -> tokens t0 .. t0 + n - 1 of sequence b, [Hkv, n, w...]
  at::Tensor gather(const at::Tensor& x, int64_t b, int64_t t0, int64_t n) const {
    const int64_t m = page_count(t0, n);
    auto shape = x.sizes().vec();  // [num_pages, Hkv, page_size, w...] -> [Hkv, m * page_size, w...]
    shape.erase(shape.begin(), shape.begin() + 3);
    shape.insert(shape.begin(), {kv_heads, m * page_size});
    const auto g = x.view({num_pages * kv_heads, -1}).index_select(0, index(b, t0, n)).view(shape);
    return g.narrow(1, t0 - first_page(t0) * page_size, n);
  }
  at::Tensor rows(int kv, int64_t b, int64_t t0, int64_t n) const { return gather(*pages[kv], b, t0, n); }
  at::Tensor token_scales(int kv, int64_t b, int64_t t0, int64_t n) const { return gather(*scales[kv], b, t0, n); }
  at::Tensor channel_scales(int kv, int64_t b) const { return (*scales[kv])[slots[b]]; }
};

at::Tensor paged_decode_attention_cpu(const at::Tensor& q, const at::Tensor& kp, const at::Tensor& vp,
                                      const at::Tensor& ks, const at::Tensor& vs, const at::Tensor& bt,
                                      const at::Tensor& lengths, const c10::optional<at::Tensor>& seq_ids,
                                      c10::string_view granularity, double sm_scale, int64_t splits,
                                      const c10::optional<at::Tensor>& clamped = {}) {
  (void)splits;  // the CPU path does not split
  const auto p = check_paged_decode(q, kp, vp, ks, vs, bt, lengths, seq_ids, std::string(granularity),
                                    /*allow_fp32_q=*/true);
  check_flag(clamped, q);
  const int64_t t_max = p.max_pages * p.page_size;
  DecodeShape s{p.batch, p.q_heads, p.kv_heads, t_max, p.head_dim, p.per_token};
  s.group = p.group;
  // As the kernels do: each row's slot clamped to [0, S), its length to [0, max_pages * page_size], each
  // page id it reads to [0, num_pages); the flag set where one was.
  const int32_t* table = bt.data_ptr<int32_t>();
  std::vector<int64_t> slots(s.batch), lens(s.batch);
  bool flag = false;
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t id = seq_ids.has_value() ? seq_ids->data_ptr<int32_t>()[b] : b;
    slots[b] = std::clamp<int64_t>(id, 0, p.num_slots - 1);
    const int64_t raw = lengths.data_ptr<int32_t>()[slots[b]];
    lens[b] = std::clamp<int64_t>(raw, 0, t_max);
    flag |= slots[b] != id || raw < 1 || raw > t_max;
    for (int64_t j = 0; j * p.page_size < lens[b]; ++j) {
      const int32_t page = table[slots[b] * p.max_pages + j];
      flag |= page < 0 || page >= p.num_pages;
    }
  }
  if (flag && clamped.has_value()) clamped->fill_(1);
  const PagedSource source{{&kp, &vp}, {&ks, &vs}, table, slots, p.kv_heads, p.page_size, p.num_pages, p.max_pages};
  return attend_cpu(q, s, lens, sm_scale, source).to(q.scalar_type());
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

at::Tensor paged_decode_attention_plain_cpu(const at::Tensor& q, const at::Tensor& kp, const at::Tensor& vp,
                                            const at::Tensor& ks, const at::Tensor& vs, const at::Tensor& bt,
                                            const at::Tensor& lengths, const c10::optional<at::Tensor>& seq_ids,
                                            c10::string_view granularity, double sm_scale, int64_t splits) {
  return paged_decode_attention_cpu(q, kp, vp, ks, vs, bt, lengths, seq_ids, granularity, sm_scale, splits);
}

at::Tensor paged_decode_attention_flagged_cpu(const at::Tensor& q, const at::Tensor& kp, const at::Tensor& vp,
                                              const at::Tensor& ks, const at::Tensor& vs, const at::Tensor& bt,
                                              const at::Tensor& lengths, const c10::optional<at::Tensor>& seq_ids,
                                              c10::string_view granularity, double sm_scale, int64_t splits,
                                              const at::Tensor& clamped) {
  return paged_decode_attention_cpu(q, kp, vp, ks, vs, bt, lengths, seq_ids, granularity, sm_scale, splits, clamped);
}

// The write path: new rows k, v [B, Hkv, t_new, D] quantized as the kernels quantize them. Sequence b
// writes its first n[b] rows at positions start[b] .. (a position at or past max_tokens is dropped),
// row_of(b, h, pos) the row of the cache (viewed as [rows, D] int8 or [rows, D / 2] packed INT4) that
// token pos of KV head h of b lands in, which is also its token scales' row; chan_of(b, h) the row of
// its calibrated channel scales ([rows, D]). Returns the values that saturated a channel scale.
template <typename RowOf, typename ChanOf>
int64_t append_cpu(const DecodeShape& s, const at::Tensor& k_new, const at::Tensor& v_new, void* const dst[2],
                   float* const scales[2], const std::vector<int64_t>& n, const std::vector<int64_t>& start,
                   const RowOf& row_of, const ChanOf& chan_of) {
  const int64_t t_new = k_new.size(2), D = s.head_dim, G = s.group;  // G 0: int8; INT4: a scale's channels
  const at::Tensor src[2] = {k_new.to(at::kFloat).contiguous(), v_new.to(at::kFloat).contiguous()};
  int64_t clipped = 0;
  for (int kv = 0; kv < 2; ++kv) {
    for (int64_t b = 0; b < s.batch; ++b) {
      for (int64_t h = 0; h < s.kv_heads; ++h) {
        const float* ch = scales[kv] + chan_of(b, h) * D;  // calibrated channel scales
        for (int64_t j = 0; j < n[b] && start[b] + j < s.max_tokens; ++j) {
          const float* x = src[kv].data_ptr<float>() + ((b * s.kv_heads + h) * t_new + j) * D;
          const int64_t row = row_of(b, h, start[b] + j);
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
            continue;
          }
          uint8_t* out = static_cast<uint8_t*>(dst[kv]) + row * (D / 2);  // element 2i low, 2i + 1 high
          if (kv == 1 || s.per_token) {  // INT4 values always in token groups
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
        }
      }
    }
  }
  return clipped;
}

void kv_append_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_scales,
                   const at::Tensor& v_scales, const at::Tensor& lengths, const at::Tensor& arrivals,
                   const at::Tensor& saturated, const at::Tensor& k_new, const at::Tensor& v_new,
                   const c10::optional<at::Tensor>& counts, c10::string_view granularity) {
  const auto s = check_append(k_cache, v_cache, k_scales, v_scales, lengths, arrivals, saturated, k_new, v_new,
                              counts, std::string(granularity));
  const int64_t t_new = k_new.size(2);
  auto* len = lengths.data_ptr<int32_t>();
  std::vector<int64_t> n(s.batch), start(s.batch);
  for (int64_t b = 0; b < s.batch; ++b) {
    n[b] = counts.has_value() ? counts->data_ptr<int32_t>()[b] : t_new;
    start[b] = len[b];
    TORCH_CHECK_VALUE(n[b] >= 0 && n[b] <= t_new, "kvpack: counts[", b, "] = ", n[b], " is not in [0, ", t_new, "]");
    TORCH_CHECK_VALUE(len[b] >= 0 && len[b] + n[b] <= s.max_tokens, "kvpack: sequence ", b, " holds ", len[b],
                      " tokens; appending ", n[b], " would pass max_tokens = ", s.max_tokens);
  }
  void* const dst[2] = {k_cache.data_ptr(), v_cache.data_ptr()};
  float* const scales[2] = {k_scales.data_ptr<float>(), v_scales.data_ptr<float>()};
  const int64_t clipped = append_cpu(
      s, k_new, v_new, dst, scales, n, start,
      [&](int64_t b, int64_t h, int64_t pos) { return (b * s.kv_heads + h) * s.max_tokens + pos; },
      [&](int64_t b, int64_t h) { return b * s.kv_heads + h; });
  for (int64_t b = 0; b < s.batch; ++b) len[b] = static_cast<int32_t>(len[b] + n[b]);
  saturated.add_(clipped);
}

// The paged write, as the kernels do it: each row's slot clamped to [0, S), its start (the slot's
// length) to [0, max_pages * page_size], rows past that dropped, each page id clamped to the pool; the
// slot's length advanced (to at most max_pages * page_size). kvpack.paged_kv_append checks every value
// first and raises, having written nothing.
void paged_kv_append_cpu(const at::Tensor& kp, const at::Tensor& vp, const at::Tensor& ks, const at::Tensor& vs,
                         const at::Tensor& bt, const at::Tensor& lengths, const at::Tensor& arrivals,
                         const at::Tensor& saturated, const at::Tensor& k_new, const at::Tensor& v_new,
                         const c10::optional<at::Tensor>& seq_ids, c10::string_view granularity) {
  const auto p = check_paged_append(kp, vp, ks, vs, bt, lengths, arrivals, saturated, k_new, v_new, seq_ids,
                                    std::string(granularity));
  const int64_t t_max = p.max_pages * p.page_size;
  DecodeShape s{p.batch, p.kv_heads, p.kv_heads, t_max, p.head_dim, p.per_token};
  s.group = p.group;
  const int32_t* table = bt.data_ptr<int32_t>();
  auto* len = lengths.data_ptr<int32_t>();
  std::vector<int64_t> slots(s.batch), n(s.batch, k_new.size(2)), start(s.batch);
  for (int64_t b = 0; b < s.batch; ++b) {
    slots[b] = std::clamp<int64_t>(seq_ids.has_value() ? seq_ids->data_ptr<int32_t>()[b] : b, 0, p.num_slots - 1);
    start[b] = std::clamp<int64_t>(len[slots[b]], 0, t_max);
  }
  void* const dst[2] = {kp.data_ptr(), vp.data_ptr()};
  float* const scales[2] = {ks.data_ptr<float>(), vs.data_ptr<float>()};
  const int64_t clipped = append_cpu(
      s, k_new, v_new, dst, scales, n, start,
      [&](int64_t b, int64_t h, int64_t pos) {
        const int64_t page = std::clamp<int64_t>(table[slots[b] * p.max_pages + pos / p.page_size], 0, p.num_pages - 1);
        return (page * p.kv_heads + h) * p.page_size + pos % p.page_size;
      },
      [&](int64_t b, int64_t h) { return slots[b] * p.kv_heads + h; });
  for (int64_t b = 0; b < s.batch; ++b) len[slots[b]] = static_cast<int32_t>(std::min(start[b] + n[b], t_max));
  saturated.add_(clipped);
}

}  // namespace

TORCH_LIBRARY_IMPL(kvpack, CPU, m) {
  m.impl("decode_attention", &decode_attention_plain_cpu);
  m.impl("decode_attention_flagged", &decode_attention_flagged_cpu);
  m.impl("paged_decode_attention", &paged_decode_attention_plain_cpu);
  m.impl("paged_decode_attention_flagged", &paged_decode_attention_flagged_cpu);
  m.impl("kv_append", &kv_append_cpu);
  m.impl("paged_kv_append", &paged_kv_append_cpu);
}

}  // namespace kvpack
