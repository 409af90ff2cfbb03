// Host launchers of the INT8 KV cache kernels (kernels/decode_attention.cu): fused decode
// attention over an int8 cache, and the write path that quantizes new tokens into it.
// kernels/decode_ops.cpp (g++) checks the tensors and calls these with raw pointers.
//
// The cache layout (kvpack.KVCache documents it for users):
//   k, v       int8 [B, Hkv, T_max, D], row-major: one sequence's tokens of one KV head are
//              contiguous, so a split of the sequence reads one contiguous block of memory
//   scales     fp32, granularity "token":   [B, Hkv, T_max]  (one scale per token row of K or V)
//                    granularity "channel": [B, Hkv, D]      (the paper's, fixed by calibration)
//   lengths    int32 [B], tokens held by each sequence (1 <= lengths[b] <= T_max for attention)
// The INT4 cache (group != 0; kvpack/int4.py documents it): k, v uint8 [B, Hkv, T_max, D / 2], two
// values a byte; v scales (and k scales, "token") fp32 [B, Hkv, T_max, D / group], group 32, 64 or
// 128; k scales per channel [B, Hkv, D] with "channel". Paged, as INT8's pages: uint8 pages
// [num_pages, Hkv, page_size, D / 2], group scales [num_pages, Hkv, page_size, D / group], channel
// key scales [num_slots, Hkv, D].
// The caller guarantees contiguous tensors on the current device, D in {64, 128, 256},
// Hq a multiple of Hkv, q and out of one dtype (fp16 or bf16), a device guard and the stream.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include <c10/core/ScalarType.h>

namespace kvpack {
namespace cuda {

struct DecodeArgs {
  const void* q;             // [B, Hq, D], fp16 or bf16
  const int8_t* k;           // [B, Hkv, T_max, D]
  const int8_t* v;           // [B, Hkv, T_max, D]
  const float* k_scales;     // [B, Hkv, T_max] (token) or [B, Hkv, D] (channel)
  const float* v_scales;     // likewise
  const int32_t* lengths;    // [B], or nullptr: every sequence holds T_max tokens
  void* out;                 // [B, Hq, D], q's dtype
  float* partial_out;        // workspace [B, Hq, splits, D]
  float* partial_stats;      // workspace [B, Hq, splits, 2]: (running max, sum) in log2 units
  int64_t batch;
  int64_t q_heads;
  int64_t kv_heads;
  int64_t max_tokens;        // T_max
  int head_dim;              // D
  int splits;                // from decode_splits(); each sequence is cut into this many parts
  float sm_scale;            // softmax scale (1/sqrt(D) by default, chosen by the caller)
  bool per_token;            // scale granularity: true "token", false "channel"
  c10::ScalarType dtype;     // of q and out
  cudaStream_t stream;
  int32_t* clamped = nullptr;  // [1] or nullptr: set to 1 where a length, page id or sequence id was clamped
  // Paged cache (block_tables != nullptr): k, v are pages [num_pages, Hkv, page_size, D], token
  // scales [num_pages, Hkv, page_size], channel scales [num_slots, Hkv, D]; block_tables int32
  // [num_slots, max_pages], lengths [num_slots]; query row b reads slot seq_ids[b] (nullptr: b).
  // max_tokens is then max_pages * page_size.
  const int32_t* block_tables = nullptr;
  const int32_t* seq_ids = nullptr;
  int64_t num_pages = 0;
  int64_t max_pages = 0;
  int64_t num_slots = 0;
  int page_size = 0;
  int group = 0;             // 0: the INT8 cache; else the INT4 cache's group size
};

// The number of parts each sequence's tokens are split into (flash-decoding): enough warps to fill
// the device once, from its multiprocessor count and the kernel's occupancy, never parts shorter
// than a few tiles. It depends on the shapes alone, never on the lengths' values, so a decode step
// has the same launch (and workspace) every time: what a CUDA graph needs.
int decode_splits(int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t max_tokens, int head_dim,
                  c10::ScalarType dtype, bool per_token, bool paged = false, int group = 0);

void decode_attention(const DecodeArgs& args);

// Arrival counters for the split kernel's last-block merge: `count` int32 zeros on the current
// device that no launch running at the same time uses (each launch's last blocks reset theirs).
// Outside a CUDA-graph capture, one set per stream (a stream's launches run one after the other);
// inside one, a new set for each captured launch, kept for good (the graph may replay on any
// stream). Carved from one arena a device, made (and zeroed, one host wait) by the first call
// outside a capture. nullptr when there are none to give (a capture before any eager call on the
// device, or the arena used up): the caller then merges with a second kernel, the same bits.
int32_t* merge_counters(int64_t count, cudaStream_t stream);

// Tests: false makes merge_counters() give none (every merge then runs in a second kernel); returns
// the previous setting.
bool set_fused_merge(bool enabled);

struct AppendArgs {
  const void* k;             // new keys   [B, Hkv, t_new, D], dtype
  const void* v;             // new values [B, Hkv, t_new, D], dtype
  const int32_t* counts;     // [B]: how many of the t_new rows each sequence appends, or nullptr (all)
  int8_t* k_cache;           // [B, Hkv, T_max, D]
  int8_t* v_cache;
  float* k_scales;           // token: written for the new rows; channel: read (calibrated)
  float* v_scales;
  int32_t* lengths;          // [B], read for the write position, then advanced by the kernel
  int32_t* arrivals;         // [B] zeros: per-sequence block counter (the kernel resets it)
  unsigned long long* saturated;  // channel: elements clamped to +-127 (or with a zero scale)
  int64_t batch;
  int64_t kv_heads;
  int64_t new_tokens;        // t_new
  int64_t max_tokens;        // T_max
  int head_dim;
  bool per_token;
  c10::ScalarType dtype;     // of k and v: fp32, fp16 or bf16
  cudaStream_t stream;
  // Paged (block_tables != nullptr): as DecodeArgs; row b of k and v goes to slot seq_ids[b] (or b);
  // lengths, arrivals and channel scales are per slot; max_tokens = max_pages * page_size.
  const int32_t* block_tables = nullptr;
  const int32_t* seq_ids = nullptr;
  int32_t* clamped = nullptr;
  int64_t num_pages = 0;
  int64_t max_pages = 0;
  int64_t num_slots = 0;
  int page_size = 0;
  int group = 0;             // 0: INT8; else INT4 with scales per `group` channels of a token (keys per channel with "channel")
};

// One launch: quantizes K and V rows on write (per-token scales computed on the fly, per-channel
// scales read), stores them at lengths[b] + j, and advances lengths[b] by the rows appended.
void kv_append(const AppendArgs& args);

// The INT4 formats (kernels/decode_int4.cu); the functions above call these where group != 0. The
// paged cache's decode kernels are instantiated in kernels/decode_int4_paged.cu (compiled in parallel).
int decode_splits_int4(int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t max_tokens, int head_dim,
                       c10::ScalarType dtype, bool per_token, int group, bool paged);
void decode_attention_int4(const DecodeArgs& args);
void kv_append_int4(const AppendArgs& args);
int decode_splits_int4_paged(int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t max_tokens, int head_dim,
                             c10::ScalarType dtype, bool per_token, int group);
void decode_attention_int4_paged(const DecodeArgs& args);

}  // namespace cuda
}  // namespace kvpack
