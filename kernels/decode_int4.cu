// The INT4 KV cache on the GPU (issue 17): its write kernel, and the host launchers of fused decode
// attention over packed nibbles. The split kernel, its INT4 tiles (nibble -> fp16 with one LOP3 and
// one subtraction, a scale per group of channels) and the merge are shared with the INT8 cache in
// kernels/include/kvpack/decode_kernels.cuh, which says how a tile is computed; this file only
// instantiates the INT4 formats: head dimensions 64, 128, 256 with groups of 32, 64 or 128 channels
// (no larger than D), keys in groups ("token") or per channel ("channel"; values always in groups).
#include "kvpack/decode_kernels.cuh"

namespace kvpack {
namespace cuda {
namespace {

// Write path: a warp per new row of K or V; each lane quantizes D / 32 consecutive elements. Per
// group the scale absmax / 7 is reduced over the group's lanes (quant_math.h, bit-exact with
// kvpack/torch_impl.py) and written by its first lane; channel keys use their calibrated scales
// and count saturation. Two nibbles a byte, element 2i low; lengths advance as the INT8 kernel's do.
template <typename T, int D, int G, bool kKeyGroups, bool kPaged>
__global__ void __launch_bounds__(kAppendWarps * 32) kv_append_int4_kernel(const AppendParams p) {
  constexpr int E = D / 32;        // elements per lane: 2, 4 or 8
  constexpr int kLanes = G / E;    // lanes per group
  constexpr int kGroups = D / G;   // scales per row
  const int lane = threadIdx.x & 31;
  allow_dependent_launch();  // a decode kernel after it may be scheduled now (it waits for these writes)
  const int64_t b = blockIdx.y;
  const int64_t slot = kPaged ? slot_of(p.seq_ids, b, p.num_slots, p.clamped, blockIdx.x == 0 && threadIdx.x == 0) : b;
  append_rows<!kKeyGroups>(p, b, slot, [&](bool is_v, int64_t h, int64_t j, int64_t pos, unsigned long long& saturated) {
    const int64_t head = b * p.kv_heads + h;
    const T* src = static_cast<const T*>(is_v ? p.v : p.k) + (head * p.new_tokens + j) * D + lane * E;
    const VecN<T, E> x = load_vec<T, E>(src);
    // The row's place: contiguous, row pos of the (sequence, head) block; paged, in its page.
    const int64_t row = kPaged ? page_row0(p.block_tables + slot * p.max_pages, pos, p.page_size, p.max_pages,
                                           p.num_pages, p.kv_heads, h, p.clamped) + pos % p.page_size
                               : head * p.max_tokens + pos;
    uint32_t nib[E];
    if (is_v || kKeyGroups) {
      float amax = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) amax = absmax_combine(amax, to_float(x.val[e]));
#pragma unroll
      for (int o = kLanes / 2; o > 0; o /= 2) amax = absmax_combine(amax, __shfl_xor_sync(kFullMask, amax, o));
      const float s = int4_scale_from_absmax(amax);
      if (lane % kLanes == 0) (is_v ? p.v_scales : p.k_scales)[row * kGroups + lane / kLanes] = s;
#pragma unroll
      for (int e = 0; e < E; ++e) nib[e] = quantize_int4_nibble(to_float(x.val[e]), s);
    } else {
      const float* sc = p.k_scales + (slot * p.kv_heads + h) * D + lane * E;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const float xe = to_float(x.val[e]);
        nib[e] = quantize_int4_nibble(xe, sc[e]);
        saturated += saturates_int4(xe, sc[e]) ? 1u : 0u;
      }
    }
    uint32_t packed = 0;
#pragma unroll
    for (int i = 0; i < E / 2; ++i) packed |= (nib[2 * i] | (nib[2 * i + 1] << 4)) << (8 * i);
    uint8_t* dst = reinterpret_cast<uint8_t*>(is_v ? p.v_cache : p.k_cache) + row * (D / 2) + lane * (E / 2);
    if constexpr (E == 2) {
      *dst = static_cast<uint8_t>(packed);
    } else if constexpr (E == 4) {
      *reinterpret_cast<uint16_t*>(dst) = static_cast<uint16_t>(packed);
    } else {
      *reinterpret_cast<uint32_t*>(dst) = packed;
    }
  });
}

}  // namespace

int decode_splits_int4(int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t max_tokens, int head_dim,
                       c10::ScalarType dtype, bool per_token, int group, bool paged) {
  if (paged) return decode_splits_int4_paged(batch, q_heads, kv_heads, max_tokens, head_dim, dtype, per_token, group);
  return plan_splits_int4<false>(batch, q_heads, kv_heads, max_tokens, head_dim, dtype, per_token, group);
}

void decode_attention_int4(const DecodeArgs& a) {
  if (a.block_tables != nullptr) {
    decode_attention_int4_paged(a);
  } else {
    launch_decode_int4<false>(a);
  }
}

void kv_append_int4(const AppendArgs& a) {
  const AppendParams ap = append_params(a);
  const bool paged = a.block_tables != nullptr;
  const dim3 grid = append_grid(a.batch, a.kv_heads, a.new_tokens);
  KVPACK_DISPATCH_FLOAT_TYPES(a.dtype, "kv_append", [&] {
    dispatch_int4(a.head_dim, a.group, [&](auto d, auto g) {
      dispatch_bool(a.per_token, [&](auto kg) {
        dispatch_bool(paged, [&](auto pg) {
          kv_append_int4_kernel<scalar_t, decltype(d)::value, decltype(g)::value, decltype(kg)::value,
                                decltype(pg)::value><<<grid, kAppendWarps * 32, 0, a.stream>>>(ap);
          KVPACK_LAUNCH_CHECK();
        });
      });
    });
  });
}

}  // namespace cuda
}  // namespace kvpack

// tools/lab/timeline.py: the split kernel's marks (KVPACK_LAB_TIMELINE builds only; nothing otherwise)
KVPACK_LAB_TIMELINE_ACCESS(kvpack_lab_timeline_int4)
