// The INT8 KV cache on the GPU: the host launchers of fused decode attention and of the write path.
// The kernels and the arithmetic they do are in kernels/include/kvpack/decode_kernels.cuh; the INT4
// formats are instantiated in kernels/decode_int4.cu (group != 0 goes there).
#include "kvpack/decode_kernels.cuh"

#include <atomic>
#include <unordered_map>
#include <utility>

namespace kvpack {
namespace cuda {

namespace {
constexpr int64_t kArenaCounters = int64_t{1} << 20;  // 4 MiB a device: 2^20 groups' counters

struct CounterArena {
  int32_t* base = nullptr;
  int64_t used = 0;
  bool failed = false;
  std::unordered_map<cudaStream_t, std::pair<int64_t, int64_t>> eager;  // stream -> (offset, size)
};
}  // namespace

std::atomic<bool> g_fused_merge{true};

bool set_fused_merge(bool enabled) { return g_fused_merge.exchange(enabled); }

int32_t* merge_counters(int64_t count, cudaStream_t stream) {
  if (!g_fused_merge.load(std::memory_order_relaxed)) return nullptr;
  static std::mutex mu;
  static std::vector<CounterArena> arenas;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
    (void)cudaGetLastError();
    return nullptr;
  }
  const bool capturing = status != cudaStreamCaptureStatusNone;
  const int dev = current_device();
  std::lock_guard<std::mutex> lock(mu);
  if (dev >= static_cast<int>(arenas.size())) arenas.resize(dev + 1);
  CounterArena& a = arenas[dev];
  if (a.base == nullptr) {
    if (capturing || a.failed) return nullptr;
    void* p = nullptr;
    const size_t bytes = sizeof(int32_t) * kArenaCounters;
    if (cudaMalloc(&p, bytes) != cudaSuccess) {  // never freed: the process's lifetime
      (void)cudaGetLastError();
      a.failed = true;
      return nullptr;
    }
    C10_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream));
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));  // once a device: zeros before any stream uses them
    a.base = static_cast<int32_t*>(p);
  }
  int64_t n = (count + 31) / 32 * 32;
  if (!capturing) {
    const auto it = a.eager.find(stream);
    if (it != a.eager.end() && it->second.second >= n) return a.base + it->second.first;
    int64_t p2 = 32;  // a stream's set grows by doubling: a batch that grows step by step costs log2 sets
    while (p2 < n) p2 *= 2;
    n = p2;
  }
  if (a.used + n > kArenaCounters) return nullptr;
  int32_t* r = a.base + a.used;
  if (!capturing) a.eager[stream] = {a.used, n};  // a smaller earlier set of this stream is left unused
  a.used += n;
  return r;
}

int decode_splits(int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t max_tokens, int head_dim,
                  c10::ScalarType dtype, bool per_token, bool paged, int group) {
  if (group != 0) {
    return decode_splits_int4(batch, q_heads, kv_heads, max_tokens, head_dim, dtype, per_token, group, paged);
  }
  int splits = 1;
  dispatch_decode(head_dim, dtype, per_token, [&](auto d, auto qt, auto pt) {
    constexpr int D = decltype(d)::value;
    using QT = typename decltype(qt)::type;
    splits = paged ? plan_splits(split_kernel<D, QT, decltype(pt)::value, true>(), batch, q_heads, kv_heads, max_tokens)
                   : plan_splits(split_kernel<D, QT, decltype(pt)::value, false>(), batch, q_heads, kv_heads, max_tokens);
  });
  return splits;
}

void decode_attention(const DecodeArgs& a) {
  if (a.group != 0) {
    decode_attention_int4(a);
    return;
  }
  dispatch_decode(a.head_dim, a.dtype, a.per_token, [&](auto d, auto qt, auto pt) {
    constexpr int D = decltype(d)::value;
    constexpr bool kPerToken = decltype(pt)::value;
    using QT = typename decltype(qt)::type;
    if (a.block_tables != nullptr) {
      launch_decode<D, QT, kPerToken, true, 0>(a);
    } else {
      launch_decode<D, QT, kPerToken, false, 0>(a);
    }
  });
}

void kv_append(const AppendArgs& a) {
  if (a.group != 0) {
    kv_append_int4(a);
    return;
  }
  const AppendParams ap = append_params(a);
  const bool paged = a.block_tables != nullptr;
  const dim3 grid = append_grid(a.batch, a.kv_heads, a.new_tokens);
  KVPACK_DISPATCH_FLOAT_TYPES(a.dtype, "kv_append", [&] {
    dispatch_bool(a.per_token, [&](auto pt) {
      dispatch_bool(paged, [&](auto pg) {
        constexpr bool kPerToken = decltype(pt)::value;
        constexpr bool kPaged = decltype(pg)::value;
        switch (a.head_dim) {
          case 64: kv_append_kernel<scalar_t, 64, kPerToken, kPaged><<<grid, kAppendWarps * 32, 0, a.stream>>>(ap); break;
          case 128: kv_append_kernel<scalar_t, 128, kPerToken, kPaged><<<grid, kAppendWarps * 32, 0, a.stream>>>(ap); break;
          case 256: kv_append_kernel<scalar_t, 256, kPerToken, kPaged><<<grid, kAppendWarps * 32, 0, a.stream>>>(ap); break;
          default: TORCH_CHECK_VALUE(false, "kvpack: the KV cache supports head dimensions 64, 128 and 256, got ", a.head_dim);
        }
        KVPACK_LAUNCH_CHECK();
      });
    });
  });
}

}  // namespace cuda
}  // namespace kvpack

// tools/lab/timeline.py: the split kernel's marks (KVPACK_LAB_TIMELINE builds only; nothing otherwise)
KVPACK_LAB_TIMELINE_ACCESS(kvpack_lab_timeline_int8)
