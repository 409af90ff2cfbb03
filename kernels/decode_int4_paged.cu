// The paged INT4 KV cache on the GPU: the host launchers of fused decode attention over packed
// nibbles in pages (kvpack.PagedKVCache(bits=4)). The same split kernel and tiles as the contiguous
// INT4 cache (kernels/decode_int4.cu), reading each tile from the page its block table names; a
// file of its own so that its instantiations compile beside the contiguous ones. The write path of
// both layouts is kernels/decode_int4.cu's.
#include "kvpack/decode_kernels.cuh"

namespace kvpack {
namespace cuda {

int decode_splits_int4_paged(int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t max_tokens, int head_dim,
                             c10::ScalarType dtype, bool per_token, int group) {
  int splits = 1;
  dispatch_decode_int4(head_dim, group, dtype, per_token, [&](auto d, auto g, auto qt, auto kg) {
    splits = plan_splits(split_kernel<decltype(d)::value, typename decltype(qt)::type, decltype(kg)::value, true,
                                      decltype(g)::value>(),
                         batch, q_heads, kv_heads, max_tokens);
  });
  return splits;
}

void decode_attention_int4_paged(const DecodeArgs& a) {
  dispatch_decode_int4(a.head_dim, a.group, a.dtype, a.per_token, [&](auto d, auto g, auto qt, auto kg) {
    launch_decode<decltype(d)::value, typename decltype(qt)::type, decltype(kg)::value, true, decltype(g)::value>(a);
  });
}

}  // namespace cuda
}  // namespace kvpack
