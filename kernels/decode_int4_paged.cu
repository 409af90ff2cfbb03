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
  return plan_splits_int4<true>(batch, q_heads, kv_heads, max_tokens, head_dim, dtype, per_token, group);
}

void decode_attention_int4_paged(const DecodeArgs& a) { launch_decode_int4<true>(a); }

}  // namespace cuda
}  // namespace kvpack
