// The decode kernels of the quantized KV cache, shared by kernels/decode_attention.cu (INT8) and
// kernels/decode_int4.cu (INT4): the split kernel (templated on the head dimension, the query type,
// the scale granularity, paged or contiguous, and the INT4 group size, 0 for INT8), its tiles, the
// merge kernel and the write kernels. Each .cu file instantiates its own formats, so the two compile
// in parallel.
//
// The INT8 KV cache on the GPU: fused decode attention over the int8 cache, and the write path.
//
// Decode attention (flash-decoding over int8): one query token per sequence attends over its
// cache. Each sequence's tokens are cut into `splits` parts; a warp owns one part of one KV head
// for up to 8 of the query heads that share it (grouped-query attention), keeps an online-softmax
// state (running max, sum, partial output) in registers, and writes it once; the last block of a
// sequence's KV head to finish merges the parts of its query heads (arrival counters; up to 128
// parts, else a second kernel merges them). K and V are read once, as int8, straight into
// registers; nothing dequantized is ever written.
//
// The arithmetic of a warp, per tile of 16 tokens (g = lane / 4, t = lane % 4):
//   scores   INT8: S^T[h, tok] = Q_i[h, :] . K[tok, :] on the integer tensor cores (mma m16n8k32,
//            s8 x s8 -> s32, exact): Q' = q * sm_scale * log2(e) (* the channel's K scale) times a
//            power of two per head, rounded to an integer q_i with its largest element in [2^13,
//            2^14] and split into two int8 digits, q_i = 256 hi + lo; the A operand holds the
//            warp's heads' high digits in rows 0..7 and their low digits in rows 8..15, the B
//            operand is the int8 K tile as loaded (no conversion at all). Thread (g, t) loads
//            16-byte pieces of K rows g and g + 8 and feeds word pairs as they lie: the head
//            dimension is permuted (k-slot 4t of chunk 2l + h is d = 64l + 16t + 8h), and the
//            digits are laid out with the same permutation, so the dot product is unchanged and no
//            shuffle or shared memory is needed. The score is 256 c_hi + c_lo, one I2F.
//            INT4: S[tok, h] = K[tok, :] . Q'[h, :] (mma m16n8k16, fp16 in, fp32 accumulate): the
//            converted K tile is the A operand (rows g and g + 8, the tokens this thread loaded),
//            Q'^T the B operand (the warp's 8 heads), one mma per 16 channels for the whole tile;
//            P' then reaches the P'V mma's operand by one movmatrix transpose per 8 tokens.
//   int8 -> fp16 (V) without a conversion instruction: b ^ 0x80 is b + 128 as an unsigned byte;
//            placed under the fp16 exponent of 1024 (0x64XX, one PRMT for two values) it reads
//            1024 + b + 128, and one fp16x2 subtraction of 1152 leaves b, exactly (|b| <= 128 is
//            exact in fp16). Two values per PRMT and per HSUB2: no I2F, which Hopper runs at a
//            quarter rate.
//   softmax  scores are in log2 units (sm_scale * log2(e) is folded into Q'), exp2 on the running
//            max, as flash attention does. Per-token K scales multiply the fp32 scores; per-channel
//            K scales are folded into Q' once.
//   output   O^T[d, h] += V^T[d, tok] P'^T[tok, h] on the tensor cores: for INT8 the C fragment of
//            S^T is already the B fragment of P'^T (tokens 2t, 2t+1, 2t+8, 2t+9 of head g), and the
//            V tile is the A operand, its two token rows per register interleaved with one PRMT.
//            Per-token V scales fold into P' (P'[tok] = p[tok] * vs[tok], kept in fp16 range by
//            a second running max, of log2(p * vs)); per-channel V scales multiply the output once.
// The kernel's own error: INT8, each element of Q' off by at most 2^-14 of its head's largest
// (kvpack/reference.py's int8_query_error); INT4, Q' in fp16 (2^-11 relative, its largest element
// in [2^14, 2^15), so fp16 neither overflows nor flushes); P' in fp16 (2^-11 relative).
// kvpack/reference.py's decode_attention is the float64 function it is tested against.
//
// Write path (kv_append): a warp per new row of K or V: per-token scale absmax / 127 computed on the
// fly (quant_math.h, bit-exact with the reference) or the calibrated per-channel scale (values past
// it saturate at +-127 and are counted), the int8 row stored at lengths[b] + j; the last block of a
// sequence to finish advances lengths[b] (a per-sequence arrival counter that it resets), so one
// launch appends and the whole step stays on the device (CUDA-graph capturable).
#pragma once

#include <cfloat>
#include <climits>
#include <cmath>
#include <mutex>
#include <type_traits>
#include <vector>

#include "kvpack/cuda_utils.cuh"
#include "kvpack/decode_launchers.h"

namespace kvpack {
namespace cuda {
namespace {


constexpr int kDecodeWarps = 4;        // warps per block of the split kernel
// Paged split kernels: the thread's page offsets and block-table row held through an empty asm, so
// the compiler keeps them in registers instead of recomputing them (and the thread's start) every
// tile; 0 for the A/B (tools/ab_device.sh).
#ifndef KVPACK_PAGED_OPAQUE
#define KVPACK_PAGED_OPAQUE 1
#endif
constexpr int kTileTokens = 16;        // tokens per tile (the mma's k for P'V)
constexpr int kHeadsPerWarp = 8;       // query heads per warp (8 rows of the INT8 score mma, the INT4 one's n)
// Never cut a sequence into parts shorter than this (256: 4 tiles a warp); KVPACK_MIN_SPLIT_TOKENS,
// a compile-time knob for the lab (it sets the planner's, host code in this header). 256 since
// 2026-12-07 (128 before): B = 1 GQA T = 4096 then takes 16 parts, not 32, the faster count in the
// short-steps sweeps of both GPUs; on an H100, in one job, INT8 5% faster there and 10% at T = 8192
// (32 parts, not 48), unchanged where the planner wanted longer parts anyway.
#ifndef KVPACK_MIN_SPLIT_TOKENS
#define KVPACK_MIN_SPLIT_TOKENS 256
#endif
constexpr int kMinSplitTokens = KVPACK_MIN_SPLIT_TOKENS;
constexpr int kMaxSplits = 4096;       // the merge keeps one weight per part in shared memory
// Up to this many parts, the last block of a (sequence, KV head, head group) to finish merges the
// parts itself (no second launch); beyond it, decode_combine_kernel does, a block per query head.
constexpr int kFusedMergeMaxSplits = 128;
// Compile-time knobs for the lab (tools/ab_device.sh builds variants with them flipped):
// KVPACK_FUSED_MERGE, the last-block merge (0: every merge in decode_combine_kernel, as before it);
// KVPACK_EARLY_LOADS, the query's loads (16 bytes each) issued first, before the sequence's length
// is known (0: scalar loads when the query is prepared, after the first tiles' loads);
// KVPACK_PRELOAD_ALL, every buffer's first tile loading before the query is prepared (0: kBuffers - 1
// of them, the next after the query; 1 costs 16-32 more bytes of spill at D = 128).
#ifndef KVPACK_FUSED_MERGE
#define KVPACK_FUSED_MERGE 1
#endif
#ifndef KVPACK_EARLY_LOADS
#define KVPACK_EARLY_LOADS 1
#endif
#ifndef KVPACK_PRELOAD_ALL
#define KVPACK_PRELOAD_ALL 0
#endif
// KVPACK_MERGE_UNROLL, the parts a thread of the last-block merge reads before it sums them (each
// read is an L2 round trip; more in flight, fewer round trips, more registers). 16 since 2026-12-07
// (8 before): on an H100, in one job, 0.3 us faster at B = 1 GQA T = 4096 (32 parts) and 0.6 us at
// T = 32768 (48 parts), level elsewhere (reports/reference/h100/logs/short_ab_28cffe7/). Loading a
// thread's first 8 or 16 parts before the weights (so that the two round trips overlap) was slower.
#ifndef KVPACK_MERGE_UNROLL
#define KVPACK_MERGE_UNROLL 16
#endif
constexpr int kMergeUnroll = KVPACK_MERGE_UNROLL;
// KVPACK_FAST_EXP, the softmax's exp2 and log2 and the INT4 ratios' reciprocal as single MUFU
// instructions that flush subnormals to zero (0: exp2f, __log2f and __fdividef, each with a range
// fix-up of three or four more instructions).
#ifndef KVPACK_FAST_EXP
#define KVPACK_FAST_EXP 1
#endif
// KVPACK_FAST_LOADS, every tile inside a contiguous cache loaded from the thread's own start at
// offsets known at compile time (load_tile_at; a paged tile never crosses its page and never needs a
// clamp); 0: every load's row clamped to the cache's last, as before. (INT4 at D = 128 kept the
// clamped loads until its tile's registers shrank with S = K Q'^T; measured on an H100 in one job,
// reports/reference/h100/logs/kq_imma_ab_afb578f/, variant fl2: the fast loads then made it 5-6.5% faster at T >= 32768.)
#ifndef KVPACK_FAST_LOADS
#define KVPACK_FAST_LOADS 1
#endif
// Resident blocks per multiprocessor the split kernel is compiled for (a register budget): at
// D = 128, 3 blocks (12 warps, 168 registers, no local memory: 8347ac7's 64-bit block indices spilled
// 16 bytes there and cost INT8 up to 5%, see tools/lab/NOTES.md) rather than the 2 that 183 registers
// allow, for more bytes in flight; D = 64 fits 4, D = 256 takes what 255 registers leave (2).
// INT4 (G) takes the same budgets: at D = 128, 4 blocks (128 registers, 56 bytes spilled) ran 8-10%
// slower than 3 on an H100 (reports/reference/h100/int4/).
template <int D, int G = 0>
constexpr int kDecodeMinBlocks = D == 128 ? 3 : (D == 64 ? 4 : 1);
// Tiles a warp holds (kBuffers - 1 loading while one is computed). INT8: two up to D = 128, one at
// D = 256 (two would not fit its registers). INT4 at D = 128: KVPACK_INT4_BUFFERS (default 3, a
// compile-time knob for the lab). Measured on an H100 in one job (92c6e34, tools/ab_device.sh,
// reports/reference/h100/logs/int4_buffers_ab_92c6e34/): three tiles against two were 2% faster at
// the large MHA points (B32 T32768, T131072) and equal elsewhere, and 2.5% slower at D = 64, which
// keeps two. INT4 is not short of bytes in flight: the gap to its byte bound is elsewhere.
#ifndef KVPACK_INT4_BUFFERS
#define KVPACK_INT4_BUFFERS 3
#endif
template <int D, int G = 0>
constexpr int kDecodeBuffers = D > 128 ? 1 : (G > 0 && D == 128 ? KVPACK_INT4_BUFFERS : 2);
// KVPACK_PDL: the split kernel is launched as a programmatic dependent (sm_90: the launch attribute
// programmaticStreamSerialization), so its blocks may be scheduled while the kernel before it in the
// stream finishes; each block waits (griddepcontrol.wait) for that kernel's completion and writes
// before it touches memory, then lets its own dependent start. What it saves is the launch gap
// between back-to-back kernels (eager calls, or a captured step); 0: a plain launch, as before.
// Measured on an H100 in one job (reports/reference/h100/logs/pdl_ab_7936de0/): back-to-back default
// calls 1.5-2.7 us faster (B = 1 GQA T = 32768: 1.019x a graph replay against 1.054x), the replay
// itself 0.3 us faster at T = 4096; one call timed alone unchanged.
#ifndef KVPACK_PDL
#define KVPACK_PDL 1
#endif
// Paged: how many loads ahead a tile's page id is read from the block table (KVPACK_PAGE_LOOKAHEAD).
// 2 since 2026-12-07 (1 before: the id of the next load, read as the current one goes out): on an
// H100, in one job, paged INT4 (pages of 16) 4% faster at T = 131072 B = 8 MHA and T = 32768 B = 32
// GQA, level with the contiguous kernel; paged INT8 level or 1% faster; 3 was slower than 2.
#ifndef KVPACK_PAGE_LOOKAHEAD
#define KVPACK_PAGE_LOOKAHEAD 2
#endif
// Whether the split kernel takes the unclamped loads (KVPACK_FAST_LOADS). Measured on an H100 in one
// job (reports/reference/h100/logs/fast_tile_ab_7db8267/, the variant noload): they made INT8 0-1.5%
// faster and INT4 at D = 64 6% faster; INT4 at D = 128 then spilled and ran 1-4% slower, which it no
// longer does (above).
constexpr bool kFastLoads = KVPACK_FAST_LOADS != 0;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;

// ---- register-level helpers --------------------------------------------------------------------

// Two biased bytes of x (selected by sel, 0x4140: bytes 0, 1; 0x4342: bytes 2, 3) as fp16x2 of
// their signed values: 0x64XX is 1024 + XX, and XX = b + 128.
__device__ __forceinline__ uint32_t biased_to_f16x2(uint32_t x, uint32_t sel) {
  const uint32_t h = __byte_perm(x, 0x64646464u, sel);
  uint32_t r;
  asm("sub.f16x2 %0, %1, %2;" : "=r"(r) : "r"(h), "r"(0x64806480u));  // 1152 = 1024 + 128
  return r;
}

__device__ __forceinline__ uint32_t pack_f16x2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// C += A B, m16n8k16, fp16 inputs, fp32 accumulators (sm_80 and later).
__device__ __forceinline__ void mma_f16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                        uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// C += A B, m16n8k32, int8 inputs, int32 accumulators (sm_80 and later): exact.
__device__ __forceinline__ void mma_s8(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                       uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Programmatic dependent launch (sm_90): the primary kernel lets its dependent start; the
// dependent waits for the primary's writes before reading them. No-ops before sm_90.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_primary() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// KVPACK_LAB_TIMELINE (lab builds only, tools/lab/timeline.py): thread 0 of each block of the split
// kernel writes the global timer (ns) and its SM's clock at points of its work, for blocks below
// kLabBlocks: mark i in g_lab_timeline[block][i] and [8 + i], the value it waited for in [16 + i] and
// the SM's id in [24]. A mark stores its value first, so that the timer is read only once the value
// has arrived (a warp issues in order). Without the macro, KVPACK_MARK is nothing: the default build's
// SASS does not change.
#ifdef KVPACK_LAB_TIMELINE
constexpr int kLabBlocks = 8192;
constexpr int kLabSlots = 32;
__device__ unsigned long long g_lab_timeline[kLabBlocks][kLabSlots];
__device__ __forceinline__ void lab_mark(int i, uint32_t value) {
  if (threadIdx.x != 0 || blockIdx.x >= kLabBlocks) return;
  unsigned long long* row = g_lab_timeline[blockIdx.x];
  asm volatile("st.volatile.global.u64 [%0], %1;" ::"l"(row + 16 + i), "l"(static_cast<unsigned long long>(value)) : "memory");
  unsigned long long gt, ck;
  unsigned sm;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(gt)::"memory");
  asm volatile("mov.u64 %0, %%clock64;" : "=l"(ck)::"memory");
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  row[i] = gt;
  row[8 + i] = ck;
  row[24] = sm;
}
#define KVPACK_MARK(i, value) lab_mark((i), (value))
// The host's access to one translation unit's timeline (each .cu that includes this header has its
// own): NAME_read copies `blocks` rows (kLabSlots each) to host memory, NAME_clear zeroes them; both
// on the current device, after the kernels before them, and return a cudaError_t.
#define KVPACK_LAB_TIMELINE_ACCESS(NAME)                                                             \
  extern "C" int NAME##_read(unsigned long long* dst, int blocks) {                                  \
    const size_t n = sizeof(unsigned long long) * kvpack::cuda::kLabSlots *                            \
                     static_cast<size_t>(blocks < kvpack::cuda::kLabBlocks ? blocks : kvpack::cuda::kLabBlocks);                  \
    return static_cast<int>(cudaMemcpyFromSymbol(dst, kvpack::cuda::g_lab_timeline, n));               \
  }                                                                                                  \
  extern "C" int NAME##_clear() {                                                                    \
    void* ptr = nullptr;                                                                             \
    cudaError_t e = cudaGetSymbolAddress(&ptr, kvpack::cuda::g_lab_timeline);                        \
    if (e == cudaSuccess) e = cudaMemset(ptr, 0, sizeof(kvpack::cuda::g_lab_timeline));              \
    return static_cast<int>(e);                                                                      \
  }
#else
#define KVPACK_MARK(i, value) \
  do {                        \
  } while (0)
#define KVPACK_LAB_TIMELINE_ACCESS(NAME)
#endif

// One MUFU instruction that flushes subnormals to zero (ex2/lg2/rcp.approx.ftz): what exp2f,
// __log2f and __fdividef wrap, without their fix-ups for subnormal inputs or results.
enum class Mufu { kExp2, kLog2, kRcp };

template <Mufu kOp>
__device__ __forceinline__ float mufu_ftz(float x) {
  float y;
  if constexpr (kOp == Mufu::kExp2) {
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  } else if constexpr (kOp == Mufu::kLog2) {
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  } else {
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  }
  return y;
}

// The softmax's exp2 and log2 (KVPACK_FAST_EXP): mufu_ftz, without the fix-up for results below
// 2^-126. A weight that small is 0 here (2^-126 of the running max's); a V scale below 2^-126 reads
// as 0 (its token's P' is 0). exp2(-inf) is +0 and log2(0) is -inf, as the masking needs.
__device__ __forceinline__ float softmax_exp2(float x) { return KVPACK_FAST_EXP ? mufu_ftz<Mufu::kExp2>(x) : exp2f(x); }

__device__ __forceinline__ float softmax_log2(float x) { return KVPACK_FAST_EXP ? mufu_ftz<Mufu::kLog2>(x) : __log2f(x); }

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFullMask, x, 1));
  return fmaxf(x, __shfl_xor_sync(kFullMask, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(kFullMask, x, 1);
  return x + __shfl_xor_sync(kFullMask, x, 2);
}

// Over the eight lanes of a column (the lanes of one t: g = 0..7): the INT4 tile's per-head reductions.
__device__ __forceinline__ float column_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFullMask, x, 4));
  x = fmaxf(x, __shfl_xor_sync(kFullMask, x, 8));
  return fmaxf(x, __shfl_xor_sync(kFullMask, x, 16));
}

__device__ __forceinline__ float column_sum(float x) {
  x += __shfl_xor_sync(kFullMask, x, 4);
  x += __shfl_xor_sync(kFullMask, x, 8);
  return x + __shfl_xor_sync(kFullMask, x, 16);
}

// The transpose of an 8x8 matrix of 16-bit values that a warp holds as thread (g, t): row g,
// columns 2t and 2t + 1 (one register); the result is held the same way (sm_75 and later).
__device__ __forceinline__ uint32_t transpose_m8n8(uint32_t x) {
  uint32_t y;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}

// N consecutive 32-bit words (N = 1, 2, or whole 16-byte vectors) from a suitably aligned address:
// the pieces of K and V a thread loads, INT8 and INT4 alike.
template <int N>
__device__ __forceinline__ void load_words(uint32_t* w, const void* p) {
  static_assert(N == 1 || N == 2 || N % 4 == 0, "pieces of 4 or 8 bytes or whole 16-byte vectors");
  if constexpr (N == 1) {
    w[0] = __ldg(static_cast<const uint32_t*>(p));
  } else if constexpr (N == 2) {
    const uint2 u = __ldg(static_cast<const uint2*>(p));
    w[0] = u.x;
    w[1] = u.y;
  } else {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const uint4 u = __ldg(static_cast<const uint4*>(p) + i);
      w[4 * i] = u.x;
      w[4 * i + 1] = u.y;
      w[4 * i + 2] = u.z;
      w[4 * i + 3] = u.w;
    }
  }
}

// ---- one tile of 16 tokens ---------------------------------------------------------------------

// What thread (g, t) holds of one tile: K rows g and g + 8 (D / 4 bytes each: 16-byte pieces at
// 64l + 16t), V rows 2t, 2t + 1, 2t + 8, 2t + 9 (D / 8 bytes each, at (D / 8) g), and, per token,
// the scales of the four tokens 2t, 2t + 1, 2t + 8, 2t + 9 of its S^T fragment.
template <int D>
struct Tile {
  static constexpr int kKVecs = D / 64;
  static constexpr int kVWords = D / 32;
  uint4 k[2][kKVecs];
  uint32_t v[4][kVWords];
  float ks[4];
  float vs[4];
};

// Token of fragment slot r (0..3) of thread t: 2t, 2t + 1, 2t + 8, 2t + 9.
__device__ __forceinline__ int slot_token(int r, int t) { return (r >> 1) * 8 + 2 * t + (r & 1); }

// The tile that starts at row tb, its rows clamped to last_row: for a tile that runs past the
// cache's end (its rows there are masked out of the softmax and read the last row: always a valid
// address). Every other tile loads through load_tile_at.
template <int D, bool kPerToken>
__device__ __forceinline__ void load_tile(Tile<D>& tile, const int8_t* __restrict__ k,
                                          const int8_t* __restrict__ v, const float* __restrict__ ks,
                                          const float* __restrict__ vs, int64_t tb, int64_t last_row,
                                          int g, int t) {
#pragma unroll
  for (int nb = 0; nb < 2; ++nb) {
    const int64_t row = min(tb + nb * 8 + g, last_row);
    const int8_t* p = k + row * D + 16 * t;
#pragma unroll
    for (int l = 0; l < Tile<D>::kKVecs; ++l) tile.k[nb][l] = __ldg(reinterpret_cast<const uint4*>(p + 64 * l));
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t row = min(tb + slot_token(r, t), last_row);
    load_words<Tile<D>::kVWords>(tile.v[r], v + row * D + (D / 8) * g);
    if constexpr (kPerToken) {
      tile.ks[r] = __ldg(ks + row);
      tile.vs[r] = __ldg(vs + row);
    }
  }
}

// Thread (g, t)'s first element of each array in a tile, counted from the tile's row 0: K row g at
// its piece, V row 2t at its channels, the token scales of its first row (INT8: row 2t; INT4: its
// groups of rows g and 2t). load_tile_at and load_tile4_at read from there at
// offsets known at compile time: a tile that lies wholly in the cache (KVPACK_FAST_LOADS; every paged
// tile, which never crosses its page) costs one multiply-add per array, not a 64-bit sum per load.
struct ThreadStart {
  int k, v, ks, vs;
};

// Offset of fragment slot r's token (slot_token) from the thread's first V row, 2t.
__device__ __forceinline__ constexpr int slot_offset(int r) { return (r >> 1) * 8 + (r & 1); }

template <int D, bool kPerToken>
__device__ __forceinline__ void load_tile_at(Tile<D>& tile, const int8_t* __restrict__ k, const int8_t* __restrict__ v,
                                             const float* __restrict__ ks, const float* __restrict__ vs) {
#pragma unroll
  for (int nb = 0; nb < 2; ++nb) {
#pragma unroll
    for (int l = 0; l < Tile<D>::kKVecs; ++l) {
      tile.k[nb][l] = __ldg(reinterpret_cast<const uint4*>(k + nb * 8 * D + 64 * l));
    }
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    load_words<Tile<D>::kVWords>(tile.v[r], v + slot_offset(r) * D);
    if constexpr (kPerToken) {
      tile.ks[r] = __ldg(ks + slot_offset(r));
      tile.vs[r] = __ldg(vs + slot_offset(r));
    }
  }
}

// The online-softmax state of a warp: for head g (lanes of quad g), the running max m of the
// scores, the sum l of exp2(s - m) (each lane its share), and mu, the running max of
// log2(p * vs) that keeps P' in fp16 range (per token only; per channel the reference is m). o holds
// O^T[d, h] * exp2(m - mu)-scaled sums for heads 2t, 2t + 1: d rows (D / 8) g + 2i and + 1.
template <int D>
struct DecodeState {
  float o[D / 16][4];
  float m[2];  // INT4: heads 2t and 2t + 1 (l: the share of tokens g, g + 8); INT8: [0], head g
  float l[2];
  float mu[2];
  // INT4: the -8 offset's share of every row of o (the rows of thread g share
  // one V group), -8 sum_tok r_tok P'[tok, h] for heads 2t, 2t + 1 (vc[0], vc[1]; rows g + 8: vc[2],
  // vc[3], zero), added to o at the end. Unused (and compiled away) elsewhere.
  float vc[4];
};

// Rescale the output columns of a thread (heads 2t and 2t + 1: a0, a1) when their reference moved,
// and the INT4 V offset's sums with them (st.vc; never read for INT8, compiled away there).
template <int D>
__device__ __forceinline__ void rescale_columns(DecodeState<D>& st, float a0, float a1) {
  if (a0 != 1.f || a1 != 1.f) {
#pragma unroll
    for (int i = 0; i < D / 16; ++i) {
      st.o[i][0] *= a0;
      st.o[i][1] *= a1;
      st.o[i][2] *= a0;
      st.o[i][3] *= a1;
    }
    st.vc[0] *= a0;
    st.vc[1] *= a1;
  }
}

// The online-softmax step of one tile, the same for every format. s: the tile's scores in log2
// units (-inf where masked), for tokens 2t, 2t + 1, 2t + 8, 2t + 9 of head g. Updates the running
// max and sum; with per-token V scales (kTokenV), P'[tok] = p[tok] * vs[tok], kept in fp16 range by
// the second running max mu. Rescales the output columns whose reference moved, and returns P'^T's
// B fragment (b0: tokens 2t, 2t + 1; b1: 2t + 8, 2t + 9).
template <int D, bool kTokenV>
__device__ __forceinline__ void softmax_step(const float (&s)[4], const float (&vs)[4], DecodeState<D>& st, int t,
                                             uint32_t& b0, uint32_t& b1) {
  float mx = -INFINITY;
#pragma unroll
  for (int r = 0; r < 4; ++r) mx = fmaxf(mx, s[r]);
  mx = quad_max(mx);
  const float m_new = fmaxf(st.m[0], mx);
  const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no token yet: keep exp2 finite
  float p[4];
  float psum = 0.f;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    p[r] = softmax_exp2(s[r] - m_use);
    psum += p[r];
  }
  const float alpha_l = softmax_exp2(st.m[0] - m_use);  // 1 when the max did not move
  st.l[0] = st.l[0] * alpha_l + psum;
  st.m[0] = m_new;

  float alpha_o = alpha_l;  // per channel P' = p: the output's reference is the score max itself
  if constexpr (kTokenV) {
    float u[4];
    float mxu = -INFINITY;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      u[r] = s[r] == -INFINITY ? -INFINITY : s[r] + softmax_log2(vs[r]);
      mxu = fmaxf(mxu, u[r]);
    }
    mxu = quad_max(mxu);
    const float mu_new = fmaxf(st.mu[0], mxu);
    const float mu_use = mu_new == -INFINITY ? 0.f : mu_new;
    alpha_o = softmax_exp2(st.mu[0] - mu_use);
#pragma unroll
    for (int r = 0; r < 4; ++r) p[r] = softmax_exp2(u[r] - mu_use);
    st.mu[0] = mu_new;
  }

  // The output columns are heads 2t and 2t + 1: their factors come from quads 2t and 2t + 1.
  rescale_columns(st, __shfl_sync(kFullMask, alpha_o, 8 * t), __shfl_sync(kFullMask, alpha_o, 8 * t + 4));

  b0 = pack_f16x2(p[0], p[1]);
  b1 = pack_f16x2(p[2], p[3]);
}

// The online-softmax step of one INT4 tile (S = K Q'^T): s holds S[tok, h] for tokens g (s[0], s[1])
// and g + 8 (s[2], s[3]) of heads 2t (s[0], s[2]) and 2t + 1 (s[1], s[3]), in log2 units (-inf where
// masked); vmax the tile's V reference scale (tile_v_ratios), which joins P' as a per-token V scale
// does in softmax_step. Per head the same arithmetic as softmax_step, its reductions over the eight
// lanes of a column; the output columns are this thread's own heads (no shuffle for their factors).
// P'[tok, h] packed as [tok g, heads 2t, 2t + 1] is row g of an 8x8 matrix; its transpose
// (movmatrix) is P'^T's B fragment.
template <int D>
__device__ __forceinline__ void softmax_step_kq(const float (&s)[4], float vmax, DecodeState<D>& st, uint32_t& b0,
                                                uint32_t& b1) {
  float p[4];
  float alpha_o[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float m_new = fmaxf(st.m[i], column_max(fmaxf(s[i], s[i + 2])));
    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no token yet: keep exp2 finite
    p[i] = softmax_exp2(s[i] - m_use);
    p[i + 2] = softmax_exp2(s[i + 2] - m_use);
    alpha_o[i] = softmax_exp2(st.m[i] - m_use);  // 1 when the max did not move
    st.l[i] = st.l[i] * alpha_o[i] + (p[i] + p[i + 2]);
    st.m[i] = m_new;
  }
  const float lv = softmax_log2(vmax);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float u0 = s[i] == -INFINITY ? -INFINITY : s[i] + lv;
    const float u1 = s[i + 2] == -INFINITY ? -INFINITY : s[i + 2] + lv;
    const float mu_new = fmaxf(st.mu[i], column_max(fmaxf(u0, u1)));
    const float mu_use = mu_new == -INFINITY ? 0.f : mu_new;
    alpha_o[i] = softmax_exp2(st.mu[i] - mu_use);
    p[i] = softmax_exp2(u0 - mu_use);
    p[i + 2] = softmax_exp2(u1 - mu_use);
    st.mu[i] = mu_new;
  }
  rescale_columns(st, alpha_o[0], alpha_o[1]);
  b0 = transpose_m8n8(pack_f16x2(p[0], p[1]));  // tokens 2t, 2t + 1 of head g
  b1 = transpose_m8n8(pack_f16x2(p[2], p[3]));  // tokens 2t + 8, 2t + 9
}

// O^T += V^T P'^T for one INT8 tile: V rows 2t, 2t + 1, 2t + 8, 2t + 9 as the A operand (their two
// token rows per register interleaved with one PRMT), P'^T (b0, b1) the B operand.
template <int D>
__device__ __forceinline__ void attend_values(const Tile<D>& tile, DecodeState<D>& st, uint32_t b0, uint32_t b1) {
#pragma unroll
  for (int w = 0; w < Tile<D>::kVWords; ++w) {
    const uint32_t va = tile.v[0][w] ^ 0x80808080u;  // token 2t
    const uint32_t vb = tile.v[1][w] ^ 0x80808080u;  // token 2t + 1
    const uint32_t vc = tile.v[2][w] ^ 0x80808080u;  // token 2t + 8
    const uint32_t vd = tile.v[3][w] ^ 0x80808080u;  // token 2t + 9
    const uint32_t ab01 = __byte_perm(va, vb, 0x5140);  // d 4w: (2t, 2t+1); d 4w + 1: (2t, 2t+1)
    const uint32_t ab23 = __byte_perm(va, vb, 0x7362);  // d 4w + 2, 4w + 3
    const uint32_t cd01 = __byte_perm(vc, vd, 0x5140);
    const uint32_t cd23 = __byte_perm(vc, vd, 0x7362);
    mma_f16(st.o[2 * w], biased_to_f16x2(ab01, 0x4140), biased_to_f16x2(ab01, 0x4342),
            biased_to_f16x2(cd01, 0x4140), biased_to_f16x2(cd01, 0x4342), b0, b1);
    mma_f16(st.o[2 * w + 1], biased_to_f16x2(ab23, 0x4140), biased_to_f16x2(ab23, 0x4342),
            biased_to_f16x2(cd23, 0x4140), biased_to_f16x2(cd23, 0x4342), b0, b1);
  }
}

// One INT8 tile. S^T = Q_i K^T on the integer tensor cores, two n-blocks of 8 tokens (K rows g and
// g + 8 of the tile): the A operand holds head g's high digits (row g) and low digits (row g + 8) of
// chunk c of 32 channels (qa[2c], qa[2c + 1]: registers j = 0, 1 for k-slots 4t.. and 16 + 4t..),
// the B operand K words 2h, 2h + 1 of piece l (chunk 2l + h) as loaded; c[0], c[1] are the high
// digits' sums for tokens 2t, 2t + 1, c[2], c[3] the low ones'. Exact in int32 (|256 c_hi + c_lo| <
// 2^30 at D = 256), then one I2F a score.
template <int D, bool kPerToken>
__device__ __forceinline__ void attend_tile(const Tile<D>& tile, const uint32_t (&qa)[D / 16][2],
                                            DecodeState<D>& st, float q_unscale, int rem, int t) {
  float s[4];
#pragma unroll
  for (int nb = 0; nb < 2; ++nb) {
    int c[4] = {0, 0, 0, 0};
#pragma unroll
    for (int l = 0; l < Tile<D>::kKVecs; ++l) {
      const uint32_t w[4] = {tile.k[nb][l].x, tile.k[nb][l].y, tile.k[nb][l].z, tile.k[nb][l].w};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int kc = 2 * l + h;
        mma_s8(c, qa[2 * kc][0], qa[2 * kc + 1][0], qa[2 * kc][1], qa[2 * kc + 1][1], w[2 * h], w[2 * h + 1]);
      }
    }
    s[2 * nb] = __int2float_rn(c[0] * 256 + c[2]);
    s[2 * nb + 1] = __int2float_rn(c[1] * 256 + c[3]);
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    float x = s[r] * q_unscale;
    if constexpr (kPerToken) x *= tile.ks[r];
    s[r] = slot_token(r, t) < rem ? x : -INFINITY;
  }
  // O^T += V^T P'^T: the S^T fragment is P'^T's B fragment.
  uint32_t b0;
  uint32_t b1;
  softmax_step<D, kPerToken>(s, tile.vs, st, t, b0, b1);
  attend_values(tile, st, b0, b1);
}

// ---- INT4: packed nibbles, a scale per group of G channels of a token --------------------------
//
// The layout (kvpack/int4.py): bytes [.., T_max, D / 2] (element 2i in the low nibble of byte i,
// stored as q + 8), scales fp32 [.., T_max, D / G] (keys per channel: [.., D], folded into Q').
// Nibble -> fp16 without a conversion instruction (nibbles_to_f16x2): a LOP3 puts two nibbles under
// the fp16 exponent of 1024 (low nibbles read 1024 + n, high ones 1024 + 16 n); an HSUB2 of 1032,
// or an HFMA2 by 1/16 minus 72, leaves q = n - 8 exactly. A group's scale cannot fold into Q' (it
// varies per token) nor into P' (it varies per channel), so its ratio to a reference scale (the
// token's largest for K, the tile's largest for V: in [0, 1], which fp16 holds to 2^-11 relative
// whatever the data's magnitude) rides inside the conversion, n r in one HFMA2 a pair
// (scaled_nibbles_to_f16x2), and the -8 r of q = n - 8 comes back on the tensor cores; the reference
// scale then multiplies the score (K) or joins P' (V, like the INT8 per-token scale).
//   K (the A operand of S = K Q'^T): thread (g, t) loads D / 32 words of K rows g and g + 8: the 16
//     bytes at 64l + 16t (D >= 128; D = 64: the 8 bytes at 8t), so its 32 (16) channels lie in one
//     group. Word j (channels e0 .. e0 + 7) feeds chunks 2j (k-slots 2t, 2t + 1: channels e0, e0 + 4;
//     2t + 8, 2t + 9: e0 + 1, e0 + 5) and 2j + 1 (e0 + 2, e0 + 6; e0 + 3, e0 + 7); Q' is laid out
//     the same way.
//   V (the A operand of O^T): thread (g, t) loads D / 16 bytes of tokens 2t, 2t + 1, 2t + 8, 2t + 9
//     at (D / 16) g (channels (D / 8) g ..., one group); a PRMT puts two tokens' bytes side by side,
//     so each LOP3 gives one channel of two tokens: the fragment the mma wants. The output rows are
//     the INT8 kernel's, so the merge is shared.
constexpr uint32_t kF16Of1024 = 0x64006400u;
constexpr uint32_t kF16Of1032 = 0x64086408u;    // 1024 + 8: a low nibble's bias
constexpr uint32_t kF16OneSixteenth = 0x2C002C00u;
constexpr uint32_t kF16Minus72 = 0xD480D480u;   // (1024 + 16 n) / 16 - 72 = n - 8: a high nibble's

__device__ __forceinline__ uint32_t lop_and_or(uint32_t x, uint32_t mask, uint32_t bits) {
  uint32_t h;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(h) : "r"(x), "r"(mask), "r"(bits));  // (x & mask) | bits
  return h;
}

__device__ __forceinline__ uint32_t hsub2(uint32_t a, uint32_t b) {
  uint32_t r;
  asm("sub.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}

__device__ __forceinline__ uint32_t hfma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

__device__ __forceinline__ uint32_t hmul2(uint32_t a, uint32_t b) {
  uint32_t r;
  asm("mul.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}

// The 8 nibbles of x as four fp16x2 of q = n - 8 (exact): f[j] holds nibble j of the low half-word
// and nibble j of the high one. Low nibbles: (x & 0x000f000f) | 0x6400.. reads 1024 + n, minus 1032;
// high nibbles in place: 1024 + 16 n, times 1/16 minus 72 in one HFMA2. One shift, four LOP3, two
// HSUB2 and two HFMA2 for 8 values.
__device__ __forceinline__ void nibbles_to_f16x2(uint32_t x, uint32_t (&f)[4]) {
  const uint32_t y = x >> 8;
  f[0] = hsub2(lop_and_or(x, 0x000f000fu, kF16Of1024), kF16Of1032);
  f[1] = hfma2(lop_and_or(x, 0x00f000f0u, kF16Of1024), kF16OneSixteenth, kF16Minus72);
  f[2] = hsub2(lop_and_or(y, 0x000f000fu, kF16Of1024), kF16Of1032);
  f[3] = hfma2(lop_and_or(y, 0x00f000f0u, kF16Of1024), kF16OneSixteenth, kF16Minus72);
}

// With a group ratio r per lane: the 8 nibbles of x as n * r, n the
// stored nibble (0..15), in the lanes and order of nibbles_to_f16x2, one HFMA2 each: low nibbles
// (1024 + n) r - 1024 r, high ones (1024 + 16 n) (r / 16) - 64 r. rs holds r, r / 16, -1024 r and
// -64 r (scaled_ratio): powers of two times r, exact in fp16 (r / 16 but below 2^-10, where it loses
// bits worth less than 2^-24 of the token's largest scale), so each HFMA2 rounds n r once. The -8 of
// q = n - 8 is restored by the caller, -8 r times a sum of Q' or of P', on the tensor cores.
struct ScaledRatio {
  uint32_t r, r16, m1024, m64;
};

__device__ __forceinline__ ScaledRatio scaled_ratio(uint32_t r) {
  return {r, hmul2(r, kF16OneSixteenth), hmul2(r, 0xE400E400u /* -1024 */), hmul2(r, 0xD400D400u /* -64 */)};
}

__device__ __forceinline__ void scaled_nibbles_to_f16x2(uint32_t x, const ScaledRatio& rs, uint32_t (&f)[4]) {
  const uint32_t y = x >> 8;
  f[0] = hfma2(lop_and_or(x, 0x000f000fu, kF16Of1024), rs.r, rs.m1024);
  f[1] = hfma2(lop_and_or(x, 0x00f000f0u, kF16Of1024), rs.r16, rs.m64);
  f[2] = hfma2(lop_and_or(y, 0x000f000fu, kF16Of1024), rs.r, rs.m1024);
  f[3] = hfma2(lop_and_or(y, 0x00f000f0u, kF16Of1024), rs.r16, rs.m64);
}

// Channel e0 of K word j of thread t (8 consecutive channels a word).
template <int D>
__device__ __forceinline__ int k4_channel0(int j, int t) {
  return D == 64 ? 16 * t + 8 * j : 128 * (j / 4) + 32 * t + 8 * (j % 4);
}

// What thread (g, t) holds of one INT4 tile: packed K rows g and g + 8 (D / 32 words each), packed V
// of tokens 2t, 2t + 1, 2t + 8, 2t + 9 (D / 64 words each), and only the scales of its own groups:
// per K row one per 128 channels (its words there share a group), per V token one. The four threads
// of a quad together hold every group of a K row, the eight of a column every group of a V row, so
// a token's largest scale is a reduction over them (shuffles), not a load of the whole scale row.
template <int D, int G>
struct Tile4 {
  static constexpr int kGroups = D / G;        // scales per token row
  static constexpr int kKWords = D / 32;       // K words per row and thread
  static constexpr int kVWords = D / 64;       // V words per token and thread
  static constexpr int kKPieces = D >= 256 ? 2 : 1;  // K scales per row and thread
  uint32_t k[2][kKWords];
  uint32_t v[4][kVWords];
  float ks[2][kKPieces];
  float vs[4];
};

template <int D, int G, bool kKeyGroups>
__device__ __forceinline__ void load_tile4(Tile4<D, G>& tile, const uint8_t* __restrict__ k,
                                           const uint8_t* __restrict__ v, const float* __restrict__ ks,
                                           const float* __restrict__ vs, int64_t tb, int64_t last_row, int g,
                                           int t) {
  using TL = Tile4<D, G>;
#pragma unroll
  for (int nb = 0; nb < 2; ++nb) {
    const int64_t row = min(tb + nb * 8 + g, last_row);
    const uint8_t* p = k + row * (D / 2);
    if constexpr (D == 64) {
      load_words<2>(tile.k[nb], p + 8 * t);
    } else {
#pragma unroll
      for (int l = 0; l < D / 128; ++l) load_words<4>(tile.k[nb] + 4 * l, p + 64 * l + 16 * t);
    }
    if constexpr (kKeyGroups) {
#pragma unroll
      for (int l = 0; l < TL::kKPieces; ++l) tile.ks[nb][l] = __ldg(ks + row * TL::kGroups + k4_channel0<D>(4 * l, t) / G);
    }
  }
  const int vgroup = ((D / 8) * g) / G;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t row = min(tb + slot_token(r, t), last_row);
    load_words<TL::kVWords>(tile.v[r], v + row * (D / 2) + (D / 16) * g);
    tile.vs[r] = __ldg(vs + row * TL::kGroups + vgroup);
  }
}

// load_tile4 for a tile inside the cache, from the thread's first elements (ThreadStart): a K piece
// l > 0 (D = 256) lies 128 / G groups after piece 0.
template <int D, int G, bool kKeyGroups>
__device__ __forceinline__ void load_tile4_at(Tile4<D, G>& tile, const uint8_t* __restrict__ k,
                                              const uint8_t* __restrict__ v, const float* __restrict__ ks,
                                              const float* __restrict__ vs) {
  using TL = Tile4<D, G>;
#pragma unroll
  for (int nb = 0; nb < 2; ++nb) {
    const uint8_t* p = k + nb * 8 * (D / 2);
    if constexpr (D == 64) {
      load_words<2>(tile.k[nb], p);
    } else {
#pragma unroll
      for (int l = 0; l < D / 128; ++l) load_words<4>(tile.k[nb] + 4 * l, p + 64 * l);
    }
    if constexpr (kKeyGroups) {
#pragma unroll
      for (int l = 0; l < TL::kKPieces; ++l) tile.ks[nb][l] = __ldg(ks + nb * 8 * TL::kGroups + l * (128 / G));
    }
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    load_words<TL::kVWords>(tile.v[r], v + slot_offset(r) * (D / 2));
    tile.vs[r] = __ldg(vs + slot_offset(r) * TL::kGroups);
  }
}

template <int D, int G>
__device__ __forceinline__ ThreadStart thread_start(int g, int t) {
  if constexpr (G == 0) {
    return {g * D + 16 * t, 2 * t * D + (D / 8) * g, 2 * t, 2 * t};
  } else {
    constexpr int kGroups = D / G;
    return {g * (D / 2) + (D == 64 ? 8 * t : 16 * t), 2 * t * (D / 2) + (D / 16) * g,
            g * kGroups + k4_channel0<D>(0, t) / G, 2 * t * kGroups + ((D / 8) * g) / G};
  }
}

// x / m for the group ratios, 0 <= x <= m: one MUFU.RCP (rcp.approx.ftz) and a multiply, whose 2 ulps
// vanish in the ratio's rounding to fp16; 0 where m is 0 or below FLT_MIN (a row whose every scale is
// subnormal holds values below 2^-122: read as 0, as the fp32 reciprocal would flush it anyway).
// KVPACK_FAST_EXP = 0: __fdividef, which rescales a subnormal m (four more instructions).
__device__ __forceinline__ float ratio_of(float x, float m) {
#if KVPACK_FAST_EXP
  const float inv = mufu_ftz<Mufu::kRcp>(m);
  return m >= FLT_MIN ? x * inv : 0.f;
#else
  return m > 0.f ? __fdividef(x, m) : 0.f;
#endif
}

// O^T += V^T P'^T for one INT4 tile. Word w of a token holds channels (D / 8) g + 8w .. + 7; its
// bytes 0, 1 (2, 3) beside the other token's (one PRMT) give channels + 0..3 (+ 4..7): f[e] is
// channel + e of both. rab, rcd: the group ratios of tokens 2t, 2t + 1 and 2t + 8, 2t + 9 (fp16x2),
// n r per value; every row of this thread's o lies in its one V group, so the -8 r offset of all of
// them is one sum over the tile's tokens, -8 r_tok P'[tok, h]: one more mma, into st.vc.
template <int D, int G>
__device__ __forceinline__ void attend_values4(const Tile4<D, G>& tile, DecodeState<D>& st, uint32_t rab,
                                               uint32_t rcd, uint32_t b0, uint32_t b1) {
  const ScaledRatio sab = scaled_ratio(rab);
  const ScaledRatio scd = scaled_ratio(rcd);
#pragma unroll
  for (int w = 0; w < Tile4<D, G>::kVWords; ++w) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const uint32_t sel = hh ? 0x7632u : 0x5410u;
      const uint32_t xab = __byte_perm(tile.v[0][w], tile.v[1][w], sel);  // tokens 2t, 2t + 1
      const uint32_t xcd = __byte_perm(tile.v[2][w], tile.v[3][w], sel);  // tokens 2t + 8, 2t + 9
      uint32_t fab[4];
      uint32_t fcd[4];
      scaled_nibbles_to_f16x2(xab, sab, fab);
      scaled_nibbles_to_f16x2(xcd, scd, fcd);
#pragma unroll
      for (int e = 0; e < 4; e += 2) mma_f16(st.o[4 * w + 2 * hh + e / 2], fab[e], fab[e + 1], fcd[e], fcd[e + 1], b0, b1);
    }
  }
  const uint32_t m8 = 0xC800C800u;  // -8
  mma_f16(st.vc, hmul2(rab, m8), 0u, hmul2(rcd, m8), 0u, b0, b1);
}

// The V ratios of one INT4 tile against the tile's largest V scale (one reduction over the warp,
// one reciprocal), as fp16x2 for tokens 2t, 2t + 1 (rab) and 2t + 8, 2t + 9 (rcd); returns that
// largest scale, which joins P' (the softmax's per-token V scale). A token far below it keeps its
// values to within 2^-24 of that scale (fp16's subnormal step), inside the 15 * 2^-11 of the
// largest V scale that the n r rounding already costs.
template <int D, int G>
__device__ __forceinline__ float tile_v_ratios(const Tile4<D, G>& tile, uint32_t& rab, uint32_t& rcd) {
  float m = fmaxf(fmaxf(tile.vs[0], tile.vs[1]), fmaxf(tile.vs[2], tile.vs[3]));
#pragma unroll
  for (int o = 1; o < 32; o *= 2) m = fmaxf(m, __shfl_xor_sync(kFullMask, m, o));
  rab = pack_f16x2(ratio_of(tile.vs[0], m), ratio_of(tile.vs[1], m));
  rcd = pack_f16x2(ratio_of(tile.vs[2], m), ratio_of(tile.vs[3], m));
  return m;
}

// One INT4 tile: S = K Q'^T, one mma per 16 channels for the whole tile. The A operand is K rows g
// and g + 8 as this thread loaded and converted them, the B operand Q'^T: qb[kc] = Q' of head g at
// k-slots 2t, 2t + 1 and 2t + 8, 2t + 9 (no zero rows); q_unscale: heads 2t and 2t + 1. Keys in
// groups: each thread's K rows g and g + 8 are the rows of its scores, so a row's largest scale (a
// quad reduction) multiplies its own scores, and the -8 r offset of both rows is one mma: A = 256 r
// (exactly 2^8 r) of rows g, g + 8 per piece, B = qc, head g's -8 2^-8 sum Q' per piece as fp16
// hi + lo (made with qa, in the split kernel), so the product is -8 r sum Q' in fp32.
template <int D, int G, bool kKeyGroups>
__device__ __forceinline__ void attend_tile4(const Tile4<D, G>& tile, const uint32_t (&qb)[D / 16][2],
                                                const uint32_t (&qc)[2], DecodeState<D>& st,
                                                const float (&q_unscale)[2], int rem, int g) {
  using TL = Tile4<D, G>;
  float kmax[2] = {1.f, 1.f};
  uint32_t r256[2][2] = {{0u, 0u}, {0u, 0u}};  // [row][piece]
  ScaledRatio rs[2][TL::kKPieces]{};
  if constexpr (kKeyGroups) {
#pragma unroll
    for (int nb = 0; nb < 2; ++nb) {
      float m = tile.ks[nb][0];
#pragma unroll
      for (int l = 1; l < TL::kKPieces; ++l) m = fmaxf(m, tile.ks[nb][l]);
      m = quad_max(m);  // the row's largest scale: the quad holds all its groups
      kmax[nb] = m;
#pragma unroll
      for (int l = 0; l < TL::kKPieces; ++l) {
        const float r = ratio_of(tile.ks[nb][l], m);
        const uint32_t ratio = pack_f16x2(r, r);
        r256[nb][l] = hmul2(ratio, 0x5C005C00u /* 256 */);
        rs[nb][l] = scaled_ratio(ratio);
      }
    }
  }
  float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int j = 0; j < TL::kKWords; ++j) {
    uint32_t f0[4];  // token g
    uint32_t f1[4];  // token g + 8
    if constexpr (kKeyGroups) {
      scaled_nibbles_to_f16x2(tile.k[0][j], rs[0][j / 4], f0);
      scaled_nibbles_to_f16x2(tile.k[1][j], rs[1][j / 4], f1);
    } else {
      nibbles_to_f16x2(tile.k[0][j], f0);
      nibbles_to_f16x2(tile.k[1][j], f1);
    }
    mma_f16(c, f0[0], f1[0], f0[1], f1[1], qb[2 * j][0], qb[2 * j][1]);
    mma_f16(c, f0[2], f1[2], f0[3], f1[3], qb[2 * j + 1][0], qb[2 * j + 1][1]);
  }
  if constexpr (kKeyGroups) mma_f16(c, r256[0][0], r256[1][0], r256[0][1], r256[1][1], qc[0], qc[1]);
  float s[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const float x = c[r] * q_unscale[r & 1] * kmax[r >> 1];
    s[r] = g + 8 * (r >> 1) < rem ? x : -INFINITY;
  }
  uint32_t rab;
  uint32_t rcd;
  const float vm = tile_v_ratios(tile, rab, rcd);
  uint32_t b0;
  uint32_t b1;
  softmax_step_kq<D>(s, vm, st, b0, b1);
  attend_values4(tile, st, rab, rcd, b0, b1);
}

struct SplitParams {
  const void* q;
  const int8_t* k;
  const int8_t* v;
  const float* k_scales;
  const float* v_scales;
  const int32_t* lengths;
  float* partial_out;
  float* partial_stats;
  int64_t batch, q_heads, kv_heads, max_tokens;
  int splits, head_groups;
  float score_scale;  // sm_scale * log2(e)
  int32_t* clamped;   // or nullptr: set to 1 where a length (or a page id, or a sequence id) was clamped
  // Paged caches (kPaged): token t of slot s lives in page block_tables[s][t / page_size], row
  // t % page_size; the pages are [num_pages, Hkv, page_size, D], token scales [num_pages, Hkv,
  // page_size], channel scales [num_slots, Hkv, D]. Query row b reads slot seq_ids[b] (or b).
  const int32_t* block_tables;
  const int32_t* seq_ids;
  int64_t num_pages, max_pages, num_slots;
  int page_size;
  // The last-block merge: one arrival counter per (sequence, KV head, head group), zero between
  // launches (merge_counters()); the last part's block to arrive merges every part of its heads into
  // out and resets its counter. nullptr: the parts are merged by a second kernel.
  int32_t* counters;
  void* out;
};

// The query heads of one (sequence b, KV head kvh) = seq_head (b * Hkv + kvh) and head group hg:
// the first, h0, and how many, nh (up to kHeadsPerWarp). The split kernel and the merge kernel
// decode their blocks with it.
struct HeadGroup {
  int64_t b;
  int64_t kvh;
  int64_t h0;
  int nh;
};

__device__ __forceinline__ HeadGroup head_group(uint32_t seq_head, int hg, int64_t q_heads, int64_t kv_heads) {
  // 32-bit divisions (a grid is < 2^31 blocks; head counts are small)
  const uint32_t hkv = static_cast<uint32_t>(kv_heads);
  const int64_t kvh = seq_head % hkv;
  const int64_t group = static_cast<uint32_t>(q_heads) / hkv;
  return {seq_head / hkv, kvh, kvh * group + hg * kHeadsPerWarp,
          static_cast<int>(min(static_cast<int64_t>(kHeadsPerWarp), group - hg * kHeadsPerWarp))};
}

// The slot (row of lengths, block_tables and channel scales) that query row b reads: seq_ids[b]
// clamped to [0, num_slots), or b. Flags a clamped id.
__device__ __forceinline__ int64_t slot_of(const int32_t* seq_ids, int64_t b, int64_t num_slots, int32_t* clamped,
                                           bool report) {
  if (seq_ids == nullptr) return b;
  const int64_t s = seq_ids[b];
  if (s < 0 || s >= num_slots) {
    if (report && clamped) *clamped = 1;
    return min(max(s, int64_t{0}), num_slots - 1);
  }
  return s;
}

// Row 0 of the page that holds token x of a slot's block-table row bt (clamped to a valid page).
__device__ __forceinline__ int64_t page_row0(const int32_t* bt, int64_t x, int page_size, int64_t max_pages,
                                             int64_t num_pages, int64_t kv_heads, int64_t kvh, int32_t* clamped) {
  int64_t page = bt[min(x / page_size, max_pages - 1)];
  if (page < 0 || page >= num_pages) {
    if (clamped) *clamped = 1;
    page = min(max(page, int64_t{0}), num_pages - 1);
  }
  return (page * kv_heads + kvh) * page_size;
}

// The merge of the parts of one (sequence, KV head, head group): for each of its nh query heads
// M = max_s m_s, w_s = 2^(m_s - M) (0 for an empty part, never written), l = sum_s w_s l_s and
// out = sum_s w_s O_s / l (times the channel's V scale where V is scaled per channel). A warp per
// head takes the weights (lanes over the parts, a fixed shuffle tree), then a thread per (head,
// 4 channels) sums the parts in order: the same arithmetic, bit for bit, in whichever kernel runs it
// (the split kernel's last block, or decode_merge_kernel). po and stats point at the group's first
// head ([nh][S][D] and [nh][S][2]), out at its first output row; the parts are read through L2
// (other blocks wrote them). s_w: kHeadsPerWarp * kFusedMergeMaxSplits floats, s_inv: kHeadsPerWarp.
template <int D, typename QT, bool kTokenV>
__device__ __forceinline__ void merge_group(const float* po, const float* stats, const float* v_scales_row, QT* out,
                                            int nh, int S, float* s_w, float* s_inv) {
  constexpr int kPer = kFusedMergeMaxSplits / 32;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  for (int h = warp; h < nh; h += static_cast<int>(blockDim.x >> 5)) {
    float2 ml[kPer];
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int s = lane + 32 * j;
      ml[j] = s < S ? __ldcg(reinterpret_cast<const float2*>(stats) + h * S + s) : make_float2(-INFINITY, 0.f);
      m = fmaxf(m, ml[j].x);
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(kFullMask, m, o));
    float l = 0.f;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int s = lane + 32 * j;
      const float w = ml[j].x == -INFINITY ? 0.f : exp2f(ml[j].x - m);
      if (s < S) s_w[h * kFusedMergeMaxSplits + s] = w;
      if (w > 0.f) l = fmaf(w, ml[j].y, l);
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) l += __shfl_xor_sync(kFullMask, l, o);
    if (lane == 0) s_inv[h] = l > 0.f ? 1.f / l : 0.f;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < nh * (D / 4); e += blockDim.x) {
    const int h = e / (D / 4);
    const int d = 4 * (e % (D / 4));
    const float* ph = po + static_cast<int64_t>(h) * S * D + d;
    const float* wh = s_w + h * kFusedMergeMaxSplits;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll kMergeUnroll
    for (int s = 0; s < S; ++s) {
      const float w = wh[s];
      const float4 v = __ldcg(reinterpret_cast<const float4*>(ph + static_cast<int64_t>(s) * D));
      if (w > 0.f) {  // an empty part's sum is garbage: selected away, never multiplied
        acc.x = fmaf(w, v.x, acc.x);
        acc.y = fmaf(w, v.y, acc.y);
        acc.z = fmaf(w, v.z, acc.z);
        acc.w = fmaf(w, v.w, acc.w);
      }
    }
    const float inv = s_inv[h];
    float r[4] = {acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv};
    if constexpr (!kTokenV) {
#pragma unroll
      for (int j = 0; j < 4; ++j) r[j] *= v_scales_row[d + j];
    }
    QT* o = out + h * D + d;
#pragma unroll
    for (int j = 0; j < 4; ++j) o[j] = from_float<QT>(r[j]);
  }
}

// The block's arrival at its group's counter, after its partial result is written: true in the
// last block of the group to arrive, which then resets the counter (every part has arrived) and
// sees every other part's writes. KVPACK_ARRIVE_ONE (default 1): after the barrier, thread 0's
// acq_rel atomic is the block's release and acquire (the barrier orders the other threads' writes
// before it and its acquire before their reads; CUTLASS's split-K semaphore does the same): one
// MEMBAR.ALL.GPU in one thread. 0: every thread's __threadfence (MEMBAR.SC.GPU) before the atomic and
// again in the last block, as the write path's arrival counter does. Measured on an H100 in one job
// (reports/reference/h100/logs/arrive_one_ab_ab67d28/): 0.3-0.6 us faster at B = 1 GQA T = 4096 to
// 32768, INT8, INT4 and paged alike, level at the large caches; tools/lab/timeline.py put it in the
// arrival (0.90 -> 0.76 us) and the last block's merge (0.5 us sooner).
#ifndef KVPACK_ARRIVE_ONE
#define KVPACK_ARRIVE_ONE 1
#endif
__device__ __forceinline__ bool arrive_last(int32_t* counter, int parts, int* s_flag) {
  if constexpr (KVPACK_ARRIVE_ONE) {
    __syncthreads();  // every thread's writes of the part happen before thread 0's release below
    if (threadIdx.x == 0) {
      int old;
      asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;" : "=r"(old) : "l"(counter) : "memory");
      const bool last = old == parts - 1;
      if (last) atomicExch(counter, 0);
      *s_flag = last;
    }
    __syncthreads();  // thread 0's acquire happens before the block's reads of the other parts
    return *s_flag != 0;
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const bool last = atomicAdd(counter, 1) == parts - 1;
    if (last) atomicExch(counter, 0);
    *s_flag = last;
  }
  __syncthreads();
  const bool last = *s_flag != 0;
  if (last) __threadfence();
  return last;
}

// One block per part of one (sequence, KV head, group of up to 8 query heads): its 4 warps take
// the part's tiles in turn (warp w: tiles w, w + 4, ...), so they stream neighbouring memory, and
// merge their states in shared memory at the end: one partial result per block.
// G: 0 for the INT8 cache, else the INT4 group size (kPerToken: keys in groups too, else per
// channel; INT4 values are always in per-token groups). Either format contiguous or paged.
template <int D, typename QT, bool kPerToken, bool kPaged, int G = 0>
__global__ void __launch_bounds__(kDecodeWarps * 32, kDecodeMinBlocks<D, G>)
    decode_split_kernel(const SplitParams p) {
  constexpr bool kInt4 = G > 0;
  constexpr bool kTokenV = kPerToken || kInt4;  // V scales per token (INT8) or per token group (INT4)
  __shared__ float s_m[kDecodeWarps][kHeadsPerWarp];
  __shared__ float s_l[kDecodeWarps][kHeadsPerWarp];
  __shared__ float s_mu[kDecodeWarps][kHeadsPerWarp];
  __shared__ float s_o[kDecodeWarps][kHeadsPerWarp][D];
  __shared__ int s_last;
  static_assert(kDecodeWarps * D >= kFusedMergeMaxSplits, "the merge's weights (kHeadsPerWarp x kFusedMergeMaxSplits) reuse s_o");
  if constexpr (KVPACK_PDL) {
    // Launched as a programmatic dependent: nothing of the previous kernel (the query, the cache, the
    // lengths it may have written; a buffer it may still read) is touched before it completes.
    wait_for_primary();
    allow_dependent_launch();
  }
  KVPACK_MARK(0, 0u);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  uint32_t item = blockIdx.x;  // (b, kvh, split, hg), hg fastest (32-bit divisions: a grid is < 2^31 blocks)
  const int hg = static_cast<int>(item % static_cast<uint32_t>(p.head_groups));
  item /= static_cast<uint32_t>(p.head_groups);
  const int split = static_cast<int>(item % static_cast<uint32_t>(p.splits));
  const HeadGroup hgr = head_group(item / static_cast<uint32_t>(p.splits), hg, p.q_heads, p.kv_heads);
  const int64_t b = hgr.b;
  const int64_t kvh = hgr.kvh;
  const int64_t h0 = hgr.h0;
  const int nh = hgr.nh;

  // Query head g's elements that this thread uses (qf below), runs of 8 from channel q_channel(l, 8c):
  // with KVPACK_EARLY_LOADS loaded first, 16 bytes at a time (q is 16-byte aligned: the op sees to
  // it), so that their latency overlaps the length's and the first tiles'.
  const bool valid = g < nh;
  const QT* qp = static_cast<const QT*>(p.q) + (b * p.q_heads + h0 + (valid ? g : 0)) * D;
  auto q_channel = [&](int l, int e) {
    return kInt4 ? k4_channel0<D>(2 * l + e / 8, t) + e % 8 : 64 * l + 16 * t + e;
  };
  uint4 qraw[D / 64][2];
  if constexpr (KVPACK_EARLY_LOADS) {
#pragma unroll
    for (int l = 0; l < D / 64; ++l) {
#pragma unroll
      for (int c = 0; c < 2; ++c) qraw[l][c] = __ldg(reinterpret_cast<const uint4*>(qp + q_channel(l, 8 * c)));
    }
  }

  // The group's arrival and, in its last block, the merge of its parts (with p.counters); else the
  // merge kernel may start (programmatic dependent launch) once every block got here or exited.
  // Every thread of the block calls it (each part's bounds are the whole block's).
  auto finish = [&](int64_t slot) {
    if (p.counters == nullptr) {
      __syncthreads();
      allow_dependent_launch();
      return;
    }
    const int64_t grp = (b * p.kv_heads + kvh) * p.head_groups + hg;
    const bool last = arrive_last(p.counters + grp, p.splits, &s_last);
    KVPACK_MARK(5, last ? 1u : 0u);
    if (!last) return;
    const int64_t bh0 = b * p.q_heads + h0;
    merge_group<D, QT, kTokenV>(p.partial_out + bh0 * p.splits * D, p.partial_stats + bh0 * p.splits * 2,
                                kTokenV ? nullptr : p.v_scales + (slot * p.kv_heads + kvh) * D,
                                static_cast<QT*>(p.out) + bh0 * D, nh, p.splits, &s_o[0][0][0], &s_l[0][0]);
    KVPACK_MARK(6, 0u);
  };

  // This part's tokens [t0, t1) of the sequence's len: parts are whole tiles, cut from the actual
  // length (read on the device), so a short sequence in a long cache is still spread over every part.
  // A length outside [1, T_max] is clamped to [0, T_max] (never read outside the cache) and, where
  // the caller passed a flag, reported there by the first block of the sequence: no host sync.
  const bool reporter = split == 0 && hg == 0 && kvh == 0 && threadIdx.x == 0;
  const int64_t slot = kPaged ? slot_of(p.seq_ids, b, p.num_slots, p.clamped, reporter) : b;
  const int64_t raw_len = p.lengths ? static_cast<int64_t>(p.lengths[slot]) : p.max_tokens;
  const int64_t len = min(max(raw_len, int64_t{0}), p.max_tokens);
  if (reporter && p.clamped && (raw_len < 1 || raw_len > p.max_tokens)) *p.clamped = 1;
  KVPACK_MARK(1, static_cast<uint32_t>(len));
  // Token positions from here on are 32-bit: T_max < 2^31 (the op checks it), so a position plus a
  // few tiles stays below 2^32 (and a division by the split count is a 32-bit one).
  const uint32_t chunk = (static_cast<uint32_t>(len) + p.splits - 1) / static_cast<uint32_t>(p.splits);
  const uint32_t chunk16 = (chunk + kTileTokens - 1) / kTileTokens * kTileTokens;
  const uint32_t t0 = split * chunk16;
  const uint32_t t1 = min(t0 + chunk16, static_cast<uint32_t>(len));
  float* stats = p.partial_stats + ((b * p.q_heads + h0) * p.splits + split) * 2;
  const int64_t stats_head_stride = static_cast<int64_t>(p.splits) * 2;
  if (t0 >= t1) {  // an empty part (the whole block agrees): the merge skips it
    if (threadIdx.x < nh) stats[threadIdx.x * stats_head_stride] = -INFINITY;
    finish(slot);
    return;
  }

  const int64_t kv_row0 = (b * p.kv_heads + kvh);  // contiguous: the (sequence, KV head) block of the cache
  const int64_t scale_row = (slot * p.kv_heads + kvh);  // channel scales' row (paged: the slot's)
  constexpr int kRowBytes = kInt4 ? D / 2 : D;
  constexpr int kRowScales = kInt4 ? D / (kInt4 ? G : 1) : 1;  // token scales per row
  const int8_t* kb = p.k + kv_row0 * p.max_tokens * kRowBytes;
  const int8_t* vb = p.v + kv_row0 * p.max_tokens * kRowBytes;
  const float* ksb = kPerToken ? p.k_scales + kv_row0 * p.max_tokens * kRowScales : nullptr;
  const float* vsb = kTokenV ? p.v_scales + kv_row0 * p.max_tokens * kRowScales : nullptr;
  const int64_t last = p.max_tokens - 1;
  const int32_t* bt = kPaged ? p.block_tables + slot * p.max_pages : nullptr;
  constexpr uint32_t kStride = kDecodeWarps * kTileTokens;
  const uint32_t first = t0 + warp * kTileTokens;
  // Tile x of this (sequence, KV head): contiguous, rows x.. of its block; paged, rows x % page_size..
  // of the page holding x (a tile never crosses a page: page_size is a multiple of 16, x of 16).
  // Paged, the page id of a tile to load is read kLookahead loads ahead (lookup, below), so that the
  // tile's loads never wait for the block table; an id is checked (clamped, flagged) only when used.
  // The page index of tile x, x / page_size, counted in tiles: u / m for u = x / 16 and m =
  // page_size / 16 (1 to 16), the high word of u * page_magic, page_magic = floor(2^32 / m) + 1: exact
  // for u < 2^27 (x < 2^31, as int32 lengths are) since m < 32; m = 1 is u itself. One multiply a
  // tile where a division by a runtime page size took about ten instructions.
  const uint32_t page_m = kPaged ? static_cast<uint32_t>(p.page_size) >> 4 : 1u;
  const uint32_t page_magic = page_m > 1 ? static_cast<uint32_t>((uint64_t{1} << 32) / page_m + 1) : 0u;
  const uint32_t page_self = page_m == 1 ? ~0u : 0u;
  auto page_index = [&](uint32_t x) -> uint32_t {
    const uint32_t u = x >> 4;  // < 2^27 + a few tiles
    return __umulhi(u, page_magic) + (u & page_self);
  };
  // A tile's place in a paged cache: its page id as read from the block table (checked where used)
  // and its first row in that page.
  struct PageRef {
    int32_t id;
    uint32_t row;
  };
  auto lookup = [&](uint32_t x) -> PageRef {
    if constexpr (kPaged) {
      const uint32_t i = page_index(x);
      return {__ldg(bt + min(i, static_cast<uint32_t>(p.max_pages - 1))),
              x - i * static_cast<uint32_t>(p.page_size)};
    } else {
      return {0, 0u};
    }
  };
  using TileT = std::conditional_t<kInt4, Tile4<D, (kInt4 ? G : 32)>, Tile<D>>;
  // Contiguous (kFastLoads): a tile whose 16 rows all lie in the cache (x <= fast_end, every tile
  // but one near the cache's end) loads without clamps (load_tile_at).
#ifdef KVPACK_LAB_UNCLAMPED  // tools/lab/sass_tile.py: the loop with only the unclamped loads, to count (never run)
  const int fast_end = INT_MAX;
#else
  const int fast_end = static_cast<int>(p.max_tokens) - kTileTokens;
#endif
  auto unclamped = [&](uint32_t x) {
    if constexpr (kFastLoads) {
      return static_cast<int>(x) <= fast_end;
    } else {
      return false;
    }
  };
  // This thread's first elements (ThreadStart) in the cache's row 0; a tile at row x adds x rows.
  const ThreadStart ts = thread_start<D, G>(g, t);
  const int8_t* kbt = kb + ts.k;
  const int8_t* vbt = vb + ts.v;
  const float* ksbt = kPerToken ? ksb + ts.ks : nullptr;
  const float* vsbt = kTokenV ? vsb + ts.vs : nullptr;
  // Paged (pages [num_pages, Hkv, page_size, row bytes], token scales [num_pages, Hkv, page_size, scales
  // a row]): the thread's place in page 0 for KV head kvh is four 32-bit element offsets (kvh * page_size
  // rows of at most 256 bytes, plus its start) added to the arrays' bases, which stay uniform (kernel
  // parameters); a tile adds row = id * Hkv * page_size + its row in the page (32 bits: check_paged
  // refuses pools above 2^32 rows), one wide multiply-add an array. Register-bound, the compiler
  // recomputed the offsets (from the thread index) and the block-table row every tile: 31 instructions
  // a tile more than the contiguous kernel at INT4 D = 64. Held through an empty asm
  // (KVPACK_PAGED_OPAQUE), the paged tile loop is the contiguous one's length within 4 instructions
  // (sm_90, tools/lab/sass_tile.py), with no spill. A page id outside [0, num_pages) is clamped where it
  // is used and flagged once, after the loop, from the largest id seen as unsigned (a negative id is
  // larger than any valid one).
  uint32_t page_seen = 0;
  const uint32_t kvh_rows = kPaged ? static_cast<uint32_t>(kvh * p.page_size) : 0u;
  const uint32_t page_rows = kPaged ? static_cast<uint32_t>(p.kv_heads * p.page_size) : 0u;
  uint32_t k_off = kvh_rows * kRowBytes + ts.k, v_off = kvh_rows * kRowBytes + ts.v;
  uint32_t ks_off = kvh_rows * kRowScales + ts.ks, vs_off = kvh_rows * kRowScales + ts.vs;
  if constexpr (kPaged && KVPACK_PAGED_OPAQUE) {  // opaque to the compiler: kept in registers, not recomputed
    asm volatile("" : "+r"(k_off), "+r"(v_off), "+r"(ks_off), "+r"(vs_off), "+l"(bt));
  }
  // Paged: the first row of a tile's page (the id clamped, the largest id seen kept for the flag).
  auto page_row = [&](PageRef page) -> uint64_t {
    page_seen = max(page_seen, static_cast<uint32_t>(page.id));
    const uint32_t id = static_cast<uint32_t>(min(max(page.id, 0), static_cast<int32_t>(p.num_pages - 1)));
    return id * page_rows + page.row;
  };
  auto load = [&](TileT& tile, uint32_t x, PageRef page) {
    if constexpr (kInt4) {
      using U8 = const uint8_t*;
      if constexpr (kPaged) {
        const uint64_t row = page_row(page);
        load_tile4_at<D, G, kPerToken>(tile, reinterpret_cast<U8>(p.k) + (row * kRowBytes + k_off),
                                       reinterpret_cast<U8>(p.v) + (row * kRowBytes + v_off),
                                       kPerToken ? p.k_scales + (row * kRowScales + ks_off) : nullptr,
                                       p.v_scales + (row * kRowScales + vs_off));
      } else if (unclamped(x)) {
        const uint64_t xr = x;
        load_tile4_at<D, G, kPerToken>(tile, reinterpret_cast<U8>(kbt) + xr * kRowBytes,
                                       reinterpret_cast<U8>(vbt) + xr * kRowBytes,
                                       kPerToken ? ksbt + xr * kRowScales : nullptr, vsbt + xr * kRowScales);
      } else {
        load_tile4<D, G, kPerToken>(tile, reinterpret_cast<U8>(kb), reinterpret_cast<U8>(vb), ksb, vsb, x, last, g, t);
      }
    } else if constexpr (kPaged) {
      const uint64_t row = page_row(page);
      load_tile_at<D, kPerToken>(tile, p.k + (row * D + k_off), p.v + (row * D + v_off),
                                 kPerToken ? p.k_scales + (row + ks_off) : nullptr,
                                 kPerToken ? p.v_scales + (row + vs_off) : nullptr);
    } else if (unclamped(x)) {
      const uint64_t xr = x;
      load_tile_at<D, kPerToken>(tile, kbt + xr * D, vbt + xr * D, kPerToken ? ksbt + xr : nullptr,
                                 kPerToken ? vsbt + xr : nullptr);
    } else {
      load_tile<D, kPerToken>(tile, kb, vb, ksb, vsb, x, last, g, t);
    }
  };

  // The first tiles' loads go out before the query is prepared: their latency overlaps it.
  // A warp holds kBuffers tiles: kBuffers - 1 loading while one is computed (kDecodeBuffers); at the
  // start, with KVPACK_PRELOAD_ALL, all kBuffers (nothing is being computed yet).
  constexpr int kBuffers = kDecodeBuffers<D, G>;
  constexpr int kPreload = (KVPACK_PRELOAD_ALL || kBuffers == 1) ? kBuffers : kBuffers - 1;
  TileT buf[kBuffers];
  // Paged: pages[i] is the page of the tile i loads ahead (pages[0] the next load's), read from the
  // block table kLookahead loads before its tile's loads need it.
  constexpr int kLookahead = kPaged ? KVPACK_PAGE_LOOKAHEAD : 1;
  PageRef pages[kLookahead];
#pragma unroll
  for (int i = 0; i < kLookahead; ++i) pages[i] = lookup(first + i * kStride);
  auto advance = [&](uint32_t loaded) {  // after the load of tile `loaded`
#pragma unroll
    for (int i = 0; i + 1 < kLookahead; ++i) pages[i] = pages[i + 1];
    pages[kLookahead - 1] = lookup(loaded + kLookahead * kStride);
  };
#pragma unroll
  for (int j = 0; j < kPreload; ++j) {
    if (first + j * kStride < t1) load(buf[j], first + j * kStride, pages[0]);
    advance(first + j * kStride);
  }

  // Q' fragments for head g. INT8: the integer digits of the A operand of S^T = Q_i K^T (attend_tile).
  // INT4: the B operand of S = K Q'^T (column g, attend_tile4): qf[8j + e] is channel e0 + e of K
  // word j (k4_channel0), and chunk 2j + h takes channels e0 + 2h, e0 + 4 + 2h (slots 2t, 2t + 1)
  // and e0 + 2h + 1, e0 + 2h + 5 (slots 2t + 8, 2t + 9).
  uint32_t qa[D / 16][2];
  uint32_t qc[2] = {0u, 0u};  // INT4 keys in groups: attend_tile4's offset fragment
  float q_unscale;
  {
    float qf[D / 4];
    float amax = 0.f;
#pragma unroll
    for (int l = 0; l < D / 64; ++l) {
#pragma unroll
      for (int e = 0; e < 16; ++e) {
        const int d = q_channel(l, e);
        const QT qe = KVPACK_EARLY_LOADS ? reinterpret_cast<const QT*>(&qraw[l][e / 8])[e % 8] : qp[d];
        float f = valid ? to_float(qe) * p.score_scale : 0.f;
        if constexpr (!kPerToken) f *= __ldg(p.k_scales + scale_row * D + d);
        qf[16 * l + e] = f;
        amax = fmaxf(amax, fabsf(f));
      }
    }
    amax = quad_max(amax);
    int e2 = 0;
    frexpf(amax, &e2);  // amax = f 2^e2, f in [0.5, 1)
    // INT4's fp16 Q': the largest element in [2^14, 2^15); INT8's integer Q': in [2^13, 2^14]
    const int shift = (amax > 0.f && amax < INFINITY) ? max(-100, min(100, (kInt4 ? 15 : 14) - e2)) : 0;
    q_unscale = ldexpf(1.f, -shift);
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
      if constexpr (!kInt4) {
        // qa[2c] (high digits) and qa[2c + 1] (low) of chunk c = kc / 2 of 32 channels, as
        // attend_tile reads them: chunk c = 2l + h, register j takes the four channels
        // 64l + 16t + 8h + 4j + (0..3) (K word 2h + j of this thread's piece l).
        const int c = kc / 2;
        const int part = kc % 2;  // 0: high digits, 1: low
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          uint32_t word = 0;
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float x = fminf(fmaxf(rintf(ldexpf(qf[16 * (c / 2) + 8 * (c % 2) + 4 * j + e], shift)), -16384.f), 16384.f);
            const int qi = static_cast<int>(x);
            const int hi = (qi + 128) >> 8;  // |hi| <= 64
            const int digit = part == 0 ? hi : qi - 256 * hi;  // lo in [-128, 127]
            word |= static_cast<uint32_t>(digit & 0xff) << (8 * e);
          }
          qa[kc][j] = word;
        }
      } else {
        const int j = kc / 2;
        const int h = kc % 2;
        qa[kc][0] = pack_f16x2(ldexpf(qf[8 * j + 2 * h], shift), ldexpf(qf[8 * j + 4 + 2 * h], shift));
        qa[kc][1] = pack_f16x2(ldexpf(qf[8 * j + 2 * h + 1], shift), ldexpf(qf[8 * j + 5 + 2 * h], shift));
      }
    }
    if constexpr (kInt4 && kPerToken) {
      // -8 2^-8 times the sum of the fp16 Q' that meets each piece's ratio (the words j of piece
      // j / 4), summed in fp32 from the same roundings as qa, split into fp16 hi + lo (the product
      // with 256 r restores -8 r sum Q' to within 2^-22 of the sum); 2^-8 keeps a piece of 32
      // values below 2^15 in fp16.
      constexpr int kWordsPerPiece = D >= 128 ? 4 : D / 32;
#pragma unroll
      for (int l = 0; l < (D >= 256 ? 2 : 1); ++l) {
        float sum = 0.f;
#pragma unroll
        for (int e = 0; e < 8 * kWordsPerPiece; ++e) {
          sum += __half2float(__float2half_rn(ldexpf(qf[8 * kWordsPerPiece * l + e], shift)));
        }
        const float x = -0.03125f * sum;  // -8 * 2^-8
        const __half hi = __float2half_rn(x);
        const __half lo = __float2half_rn(x - __half2float(hi));
        qc[l] = static_cast<uint32_t>(__half_as_ushort(hi)) | (static_cast<uint32_t>(__half_as_ushort(lo)) << 16);
      }
    }
  }

  DecodeState<D> st;
#pragma unroll
  for (int i = 0; i < D / 16; ++i) st.o[i][0] = st.o[i][1] = st.o[i][2] = st.o[i][3] = 0.f;
  st.m[0] = st.m[1] = -INFINITY;
  st.l[0] = st.l[1] = 0.f;
  st.mu[0] = st.mu[1] = -INFINITY;
  st.vc[0] = st.vc[1] = st.vc[2] = st.vc[3] = 0.f;
  // INT4: this thread's scores are heads 2t and 2t + 1 (their unscale factors, from the quads that
  // prepared them).
  const float q_unscale2[2] = {__shfl_sync(kFullMask, q_unscale, 8 * t), __shfl_sync(kFullMask, q_unscale, 8 * t + 4)};
  // rem: the tokens from tile x to the part's end (>= 1; lengths are int32, so it fits 32 bits and
  // the tile's bounds compare its own token slots with it: one subtract a tile, no 64-bit compares).
  auto attend = [&](const TileT& tile, uint32_t x) {
    const int rem = static_cast<int>(t1 - x);
    if constexpr (kInt4) {
      attend_tile4<D, G, kPerToken>(tile, qa, qc, st, q_unscale2, rem, g);
    } else {
      attend_tile<D, kPerToken>(tile, qa, st, q_unscale, rem, t);
    }
  };

  // Round r computes tiles x + j kStride, j < kBuffers, from buf[j]; before computing tile j its
  // buffer's predecessor takes the tile kBuffers - 1 ahead, so kBuffers - 1 tiles are always loading
  // while one is computed (indices static after unrolling: the buffers stay in registers). Loads go
  // out in token order, so a paged cache's page ids are read kLookahead loads ahead.
  // (Measured on the H200, INT8: a ring that reloads each buffer right after computing it, the same
  // prefetch distance, ran 10-15% slower at every shape; so did a third buffer at D = 64.)
  for (uint32_t x = first; x < t1; x += kBuffers * kStride) {
#pragma unroll
    for (int j = 0; j < kBuffers; ++j) {
      const uint32_t xj = x + j * kStride;
      if (xj >= t1) break;
      if constexpr (kBuffers > 1) {
        const uint32_t ahead = xj + (kBuffers - 1) * kStride;
        if (ahead < t1 && ahead >= first + kPreload * kStride) {  // (the first tiles were preloaded)
          load(buf[(j + kBuffers - 1) % kBuffers], ahead, pages[0]);
          advance(ahead);
        }
      } else if (xj != first) {
        load(buf[0], xj, pages[0]);
        advance(xj);
      }
      attend(buf[j], xj);
      if (xj == first) KVPACK_MARK(2, __float_as_uint(st.m[0]));
    }
  }
  KVPACK_MARK(3, __float_as_uint(st.l[0]));
  if (kPaged && page_seen >= static_cast<uint32_t>(p.num_pages) && p.clamped) *p.clamped = 1;

  // Merge the warps' states: per head the block's max M = max_w m_w, the sum l = sum_w l_w 2^(m_w - M),
  // and the output sum_w O_w 2^(mu_w - M) (O_w is relative to mu_w; mu_w - M <= log2 of the largest
  // V scale, so the factor is finite).
  if constexpr (kInt4) {  // heads 2t, 2t + 1; the lanes of a column hold two tokens' share of l
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float l_total = column_sum(st.l[i]);
      if (g == 0) {
        s_m[warp][2 * t + i] = st.m[i];
        s_l[warp][2 * t + i] = l_total;
        s_mu[warp][2 * t + i] = kTokenV ? st.mu[i] : st.m[i];
      }
    }
  } else {  // head g; each lane of the quad holds four tokens' share of l
    const float l_total = quad_sum(st.l[0]);
    if (t == 0) {
      s_m[warp][g] = st.m[0];
      s_l[warp][g] = l_total;
      s_mu[warp][g] = kTokenV ? st.mu[0] : st.m[0];
    }
  }
  __syncthreads();
  float fa = 0.f;
  float fb = 0.f;
  {
    float ma = -INFINITY;
    float mb = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      ma = fmaxf(ma, s_m[w][2 * t]);
      mb = fmaxf(mb, s_m[w][2 * t + 1]);
    }
    if (s_m[warp][2 * t] != -INFINITY) fa = exp2f(s_mu[warp][2 * t] - ma);
    if (s_m[warp][2 * t + 1] != -INFINITY) fb = exp2f(s_mu[warp][2 * t + 1] - mb);
  }
  if constexpr (kInt4) {  // the V offset, the same for every row of thread g
#pragma unroll
    for (int i = 0; i < D / 16; ++i) {
      st.o[i][0] += st.vc[0];
      st.o[i][1] += st.vc[1];
      st.o[i][2] += st.vc[0];
      st.o[i][3] += st.vc[1];
    }
  }
#pragma unroll
  for (int i = 0; i < D / 16; ++i) {
    const int d = (D / 8) * g + 2 * i;
    *reinterpret_cast<float2*>(&s_o[warp][2 * t][d]) = make_float2(st.o[i][0] * fa, st.o[i][2] * fa);
    *reinterpret_cast<float2*>(&s_o[warp][2 * t + 1][d]) = make_float2(st.o[i][1] * fb, st.o[i][3] * fb);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < nh * D; e += blockDim.x) {
    const int h = e / D;
    const int d = e % D;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) sum += s_o[w][h][d];
    p.partial_out[((b * p.q_heads + h0 + h) * p.splits + split) * D + d] = sum;
  }
  if (threadIdx.x < nh) {
    const int h = threadIdx.x;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) m = fmaxf(m, s_m[w][h]);
    float l = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      if (s_m[w][h] != -INFINITY) l += s_l[w][h] * exp2f(s_m[w][h] - m);
    }
    stats[h * stats_head_stride] = m;
    stats[h * stats_head_stride + 1] = l;
  }
  KVPACK_MARK(4, 0u);
  finish(slot);
}

struct CombineParams {
  const float* partial_out;
  const float* partial_stats;
  const float* v_scales;  // per channel: [B (paged: slots), Hkv, D], applied here; per token: unused
  void* out;
  int64_t q_heads, kv_heads;
  int splits;
  int head_dim;
  const int32_t* seq_ids;  // paged: the slot of each query row (channel scales), or nullptr
  int64_t num_slots;
  int head_groups;         // decode_merge_kernel: query-head groups per KV head
};

constexpr int kCombineThreads = 512;

// The merge's shared weights, padded to whole float4s so that the sums after them are aligned.
__host__ __device__ constexpr int combine_weights_floats(int splits) { return (splits + 3) / 4 * 4; }

template <bool kMax>
__device__ __forceinline__ float block_reduce(float x, float* scratch) {
  for (int o = 16; o > 0; o /= 2) {
    const float y = __shfl_xor_sync(kFullMask, x, o);
    x = kMax ? fmaxf(x, y) : x + y;
  }
  const int warp = threadIdx.x >> 5;
  __syncthreads();  // scratch may still be read by a previous reduction
  if ((threadIdx.x & 31) == 0) scratch[warp] = x;
  __syncthreads();
  x = scratch[0];
  for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) x = kMax ? fmaxf(x, scratch[w]) : x + scratch[w];
  return x;
}

// One block per (sequence, query head): the parts' weights exp2(m_s - m) in shared memory, then
// groups of D / 4 threads (a float4 each) sum the weighted partial outputs over the parts in
// parallel, every load independent of the others: a few round trips, not one per part.
template <typename QT, bool kPerToken>
__global__ void __launch_bounds__(kCombineThreads) decode_combine_kernel(const CombineParams p) {
  extern __shared__ float smem[];
  float* weights = smem;                   // [splits]
  float* sums = smem + combine_weights_floats(p.splits);  // [groups][D] = 4 kCombineThreads floats, 16-byte aligned
  __shared__ float scratch[kCombineThreads / 32];
  wait_for_primary();  // the split kernel's partial results
  const int64_t bh = blockIdx.x;
  const int D = p.head_dim;
  const int S = p.splits;
  const float* stats = p.partial_stats + bh * S * 2;
  float m = -INFINITY;
  for (int s = threadIdx.x; s < S; s += blockDim.x) m = fmaxf(m, stats[2 * s]);
  m = block_reduce<true>(m, scratch);
  float l = 0.f;
  for (int s = threadIdx.x; s < S; s += blockDim.x) {
    const float ms = stats[2 * s];
    // An empty part (m = -inf) has weight 0 and was never written: its sum is not read.
    const float w = (ms == -INFINITY || m == -INFINITY) ? 0.f : exp2f(ms - m);
    weights[s] = w;
    if (w > 0.f) l += w * stats[2 * s + 1];
  }
  l = block_reduce<false>(l, scratch);  // its barriers also publish `weights`
  const int row_threads = D / 4;
  const int groups = blockDim.x / row_threads;
  const int d4 = threadIdx.x % row_threads;
  const int grp = threadIdx.x / row_threads;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  const float* po = p.partial_out + bh * S * D + 4 * d4;
#pragma unroll 4
  for (int s = grp; s < S; s += groups) {
    const float w = weights[s];
    if (w > 0.f) {
      const float4 v = *reinterpret_cast<const float4*>(po + static_cast<int64_t>(s) * D);
      acc.x += w * v.x;
      acc.y += w * v.y;
      acc.z += w * v.z;
      acc.w += w * v.w;
    }
  }
  *reinterpret_cast<float4*>(sums + grp * D + 4 * d4) = acc;
  __syncthreads();
  if (grp == 0) {
    for (int g2 = 1; g2 < groups; ++g2) {
      const float4 v = *reinterpret_cast<const float4*>(sums + g2 * D + 4 * d4);
      acc.x += v.x;
      acc.y += v.y;
      acc.z += v.z;
      acc.w += v.w;
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    float r[4] = {acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv};
    if constexpr (!kPerToken) {
      const int64_t b = slot_of(p.seq_ids, bh / p.q_heads, p.num_slots, nullptr, false);
      const int64_t kvh = (bh % p.q_heads) / (p.q_heads / p.kv_heads);
#pragma unroll
      for (int j = 0; j < 4; ++j) r[j] *= p.v_scales[(b * p.kv_heads + kvh) * D + 4 * d4 + j];
    }
    QT* out = static_cast<QT*>(p.out) + bh * D + 4 * d4;
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = from_float<QT>(r[j]);
  }
}

// The merge of up to kFusedMergeMaxSplits parts where the split kernel had no arrival counters
// (merge_counters() gave none): a block per (sequence, KV head, head group), the split kernel's
// last-block merge (merge_group) run by a second kernel, so its results are the same bits.
template <int D, typename QT, bool kTokenV>
__global__ void __launch_bounds__(kDecodeWarps * 32) decode_merge_kernel(const CombineParams p) {
  __shared__ float s_w[kHeadsPerWarp * kFusedMergeMaxSplits];
  __shared__ float s_inv[kHeadsPerWarp];
  wait_for_primary();  // the split kernel's partial results
  const uint32_t item = blockIdx.x;  // (b, kvh, hg), hg fastest: the split kernel's blocks without the part
  const uint32_t groups = static_cast<uint32_t>(p.head_groups);
  const HeadGroup hgr = head_group(item / groups, static_cast<int>(item % groups), p.q_heads, p.kv_heads);
  const int64_t slot = slot_of(p.seq_ids, hgr.b, p.num_slots, nullptr, false);
  const int64_t bh0 = hgr.b * p.q_heads + hgr.h0;
  merge_group<D, QT, kTokenV>(p.partial_out + bh0 * p.splits * D, p.partial_stats + bh0 * p.splits * 2,
                              kTokenV ? nullptr : p.v_scales + (slot * p.kv_heads + hgr.kvh) * D,
                              static_cast<QT*>(p.out) + bh0 * D, hgr.nh, p.splits, s_w, s_inv);
}

template <int D, typename QT, bool kPerToken, bool kPaged, int G = 0>
constexpr auto split_kernel() {
  return &decode_split_kernel<D, QT, kPerToken, kPaged, G>;
}

template <typename F>
void dispatch_decode(int head_dim, c10::ScalarType dtype, bool per_token, F&& f) {
  auto with_d = [&](auto d) {
    dispatch_bool(per_token, [&](auto pt) {
      if (dtype == c10::ScalarType::Half) {
        f(d, TypeTag<__half>{}, pt);
      } else if (dtype == c10::ScalarType::BFloat16) {
        f(d, TypeTag<__nv_bfloat16>{}, pt);
      } else {
        TORCH_CHECK_TYPE(false, "kvpack: decode attention takes fp16 or bf16 queries, got ", dtype);
      }
    });
  };
  switch (head_dim) {
    case 64: with_d(std::integral_constant<int, 64>{}); break;
    case 128: with_d(std::integral_constant<int, 128>{}); break;
    case 256: with_d(std::integral_constant<int, 256>{}); break;
    default: TORCH_CHECK_VALUE(false, "kvpack: decode attention supports head dimensions 64, 128 and 256, got ", head_dim);
  }
}

// The INT4 formats: f(D, G) for the supported (head dimension, group size) pairs: groups of 32, 64 and
// 128 channels, at most D.
template <int D, typename F>
void dispatch_int4_group(int group, F&& f) {
  using std::integral_constant;
  if (group == 32) { f(integral_constant<int, D>{}, integral_constant<int, 32>{}); return; }
  if (group == 64) { f(integral_constant<int, D>{}, integral_constant<int, 64>{}); return; }
  if constexpr (D >= 128) {
    if (group == 128) { f(integral_constant<int, D>{}, integral_constant<int, 128>{}); return; }
  }
  TORCH_CHECK_VALUE(false, "kvpack: the INT4 cache takes groups of 32, 64 or 128 channels (at most D), got ", group,
                    " with D = ", D);
}

template <typename F>
void dispatch_int4(int head_dim, int group, F&& f) {
  switch (head_dim) {
    case 64: dispatch_int4_group<64>(group, f); break;
    case 128: dispatch_int4_group<128>(group, f); break;
    case 256: dispatch_int4_group<256>(group, f); break;
    default:
      TORCH_CHECK_VALUE(false, "kvpack: decode attention supports head dimensions 64, 128 and 256, got ", head_dim);
  }
}

// f(D, G, query type, keys in groups) for a decode call.
template <typename F>
void dispatch_decode_int4(int head_dim, int group, c10::ScalarType dtype, bool key_groups, F&& f) {
  dispatch_int4(head_dim, group, [&](auto d, auto g) {
    dispatch_bool(key_groups, [&](auto kg) {
      if (dtype == c10::ScalarType::Half) {
        f(d, g, TypeTag<__half>{}, kg);
      } else if (dtype == c10::ScalarType::BFloat16) {
        f(d, g, TypeTag<__nv_bfloat16>{}, kg);
      } else {
        TORCH_CHECK_TYPE(false, "kvpack: decode attention takes fp16 or bf16 queries, got ", dtype);
      }
    });
  });
}

// ---- write path --------------------------------------------------------------------------------

constexpr int kAppendWarps = 8;

struct AppendParams {
  const void* k;
  const void* v;
  const int32_t* counts;
  int8_t* k_cache;
  int8_t* v_cache;
  float* k_scales;
  float* v_scales;
  int32_t* lengths;
  int32_t* arrivals;
  unsigned long long* saturated;
  int64_t kv_heads, new_tokens, max_tokens;
  // Paged (kPaged): as SplitParams; row b of k and v goes to slot seq_ids[b] (or b).
  const int32_t* block_tables;
  const int32_t* seq_ids;
  int32_t* clamped;
  int64_t num_pages, max_pages, num_slots;
  int page_size;
};

// The skeleton of every write kernel (INT8 and INT4). Block (x, b) takes rows x * kAppendWarps + warp,
// strided by the grid, of sequence b's 2 Hkv t_new new rows (K first, then V); the first counts[b] of
// each head's rows that fit before T_max are handed, one per warp, to row(is_v, h, j, pos, saturated),
// pos = lengths[slot] + j. Then the warps' saturation counts (with calibrated scales) go to the
// counter, and the last block of the slot to finish advances its length (every block has read it by
// then) and resets the arrival counter for the next append.
template <bool kCountSaturated, typename Row>
__device__ __forceinline__ void append_rows(const AppendParams& p, int64_t b, int64_t slot, Row&& row) {
  const int warp = threadIdx.x >> 5;
  const int64_t per_kv = p.kv_heads * p.new_tokens;
  const int64_t n_b = p.counts ? min(max(static_cast<int64_t>(p.counts[b]), int64_t{0}), p.new_tokens) : p.new_tokens;
  const int64_t start = min(max(static_cast<int64_t>(p.lengths[slot]), int64_t{0}), p.max_tokens);
  unsigned long long saturated = 0;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kAppendWarps + warp; r < 2 * per_kv;
       r += static_cast<int64_t>(gridDim.x) * kAppendWarps) {
    const bool is_v = r >= per_kv;  // the same for the whole warp
    const int64_t rem = is_v ? r - per_kv : r;
    const int64_t j = rem % p.new_tokens;
    const int64_t pos = start + j;
    if (j >= n_b || pos >= p.max_tokens) continue;
    row(is_v, rem / p.new_tokens, j, pos, saturated);
  }
  if constexpr (kCountSaturated) {
#pragma unroll
    for (int o = 16; o > 0; o /= 2) saturated += __shfl_xor_sync(kFullMask, saturated, o);
    if ((threadIdx.x & 31) == 0 && saturated) atomicAdd(p.saturated, saturated);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(p.arrivals + slot, 1) == static_cast<int>(gridDim.x) - 1) {
      p.lengths[slot] = static_cast<int32_t>(min(start + n_b, p.max_tokens));
      p.arrivals[slot] = 0;
    }
  }
}

template <typename T, int D, bool kPerToken, bool kPaged>
__global__ void __launch_bounds__(kAppendWarps * 32) kv_append_kernel(const AppendParams p) {
  constexpr int E = D / 32;  // elements per lane
  const int lane = threadIdx.x & 31;
  allow_dependent_launch();  // a decode kernel after it may be scheduled now (it waits for these writes)
  const int64_t b = blockIdx.y;
  const int64_t slot = kPaged ? slot_of(p.seq_ids, b, p.num_slots, p.clamped, blockIdx.x == 0 && threadIdx.x == 0) : b;
  append_rows<!kPerToken>(p, b, slot, [&](bool is_v, int64_t h, int64_t j, int64_t pos, unsigned long long& saturated) {
    const int64_t head = b * p.kv_heads + h;
    const T* src = static_cast<const T*>(is_v ? p.v : p.k) + (head * p.new_tokens + j) * D + lane * E;
    const VecN<T, E> x = load_vec<T, E>(src);
    VecN<int8_t, E> q;
    float* scales = is_v ? p.v_scales : p.k_scales;
    // The row's place: contiguous, row pos of the (sequence, head) block; paged, in its page.
    const int64_t row = kPaged ? page_row0(p.block_tables + slot * p.max_pages, pos, p.page_size, p.max_pages,
                                           p.num_pages, p.kv_heads, h, p.clamped) + pos % p.page_size
                               : head * p.max_tokens + pos;
    if constexpr (kPerToken) {
      float amax = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) amax = absmax_combine(amax, to_float(x.val[e]));
#pragma unroll
      for (int o = 16; o > 0; o /= 2) amax = absmax_combine(amax, __shfl_xor_sync(kFullMask, amax, o));
      const float s = scale_from_absmax(amax);
      if (lane == 0) scales[row] = s;
#pragma unroll
      for (int e = 0; e < E; ++e) q.val[e] = quantize_value(to_float(x.val[e]), s);
    } else {
      const float* sc = scales + (slot * p.kv_heads + h) * D + lane * E;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const float xe = to_float(x.val[e]);
        const float s = sc[e];
        q.val[e] = quantize_value(xe, s);
        saturated += saturates(xe, s) ? 1u : 0u;
      }
    }
    store_vec<int8_t, E>((is_v ? p.v_cache : p.k_cache) + row * D + lane * E, q);
  });
}

// Compute capability major of the current device, read once per device.
int compute_major() {
  static std::mutex mu;
  static std::vector<int> cache;
  const int dev = current_device();
  std::lock_guard<std::mutex> lock(mu);
  if (dev >= static_cast<int>(cache.size())) cache.resize(dev + 1, -1);
  if (cache[dev] < 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&cache[dev], cudaDevAttrComputeCapabilityMajor, dev));
  return cache[dev];
}


// ---- host: the split plan and the launch, for any format --------------------------------------

// Whole waves of blocks: the fewest parts whose blocks fill the resident slots to 95% in their last
// wave. Measured on the H200: a second, nearly empty wave costs as long as the first (1088 warps for
// 1056 resident slots ran at 57% of the byte bound, 1024 at 90%), and 256 blocks in 396 slots left
// a third of the device idle.
template <typename Kernel>
int plan_splits(Kernel kernel, int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t max_tokens) {
  const int64_t resident_blocks =
      static_cast<int64_t>(sm_count()) * blocks_per_sm(reinterpret_cast<const void*>(kernel), kDecodeWarps * 32);
  const int64_t head_groups = ceil_div(q_heads / kv_heads, kHeadsPerWarp);
  const int64_t items = batch * kv_heads * head_groups;
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(kMaxSplits, ceil_div(max_tokens, kMinSplitTokens)));
  const int64_t search = std::min<int64_t>(most, 4 * ceil_div(resident_blocks, items));
  int64_t want = 1;
  double best = 0.0;
  for (int64_t s = 1; s <= search; ++s) {
    const int64_t blocks = items * s;
    const double fill = static_cast<double>(blocks) / static_cast<double>(ceil_div(blocks, resident_blocks) * resident_blocks);
    if (fill > best + 1e-9) {
      best = fill;
      want = s;
    }
    if (fill >= 0.95) break;
  }
  return static_cast<int>(std::max<int64_t>(1, std::min(want, most)));
}

// The split kernel, merging its parts in the last block of each group where it has arrival
// counters (up to kFusedMergeMaxSplits parts: one launch); else the merge kernel as its programmatic
// dependent where the device has it (sm_90), whose launch overlaps the split kernel's last blocks.
template <int D, typename QT, bool kPerToken, bool kPaged, int G>
void launch_decode(const DecodeArgs& a) {
  constexpr bool kTokenV = kPerToken || G > 0;
  const int head_groups = static_cast<int>(ceil_div(a.q_heads / a.kv_heads, kHeadsPerWarp));
  const int64_t groups = a.batch * a.kv_heads * head_groups;
  const bool small = KVPACK_FUSED_MERGE && a.splits <= kFusedMergeMaxSplits;
  int32_t* counters = small ? merge_counters(groups, a.stream) : nullptr;
  SplitParams sp{a.q, a.k, a.v, a.k_scales, a.v_scales, a.lengths, a.partial_out, a.partial_stats,
                 a.batch, a.q_heads, a.kv_heads, a.max_tokens, a.splits, head_groups, a.sm_scale * kLog2e,
                 a.clamped, a.block_tables, a.seq_ids, a.num_pages, a.max_pages, a.num_slots, a.page_size,
                 counters, a.out};
  const int64_t blocks = groups * a.splits;
  const auto kernel = split_kernel<D, QT, kPerToken, kPaged, G>();
  // Programmatic dependent launch where the device has it (sm_90): the split kernel after whatever
  // kernel the stream ran before (KVPACK_PDL), the merge kernel after the split kernel.
  cudaLaunchConfig_t cfg = {};
  cfg.stream = a.stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  const unsigned pdl = compute_major() >= 9 ? 1u : 0u;
  cfg.numAttrs = KVPACK_PDL ? pdl : 0u;
  cfg.gridDim = dim3(static_cast<unsigned>(blocks));
  cfg.blockDim = dim3(kDecodeWarps * 32);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, sp));
  if (counters != nullptr) return;
  CombineParams cp{a.partial_out, a.partial_stats, a.v_scales, a.out, a.q_heads, a.kv_heads, a.splits, D,
                   kPaged ? a.seq_ids : nullptr, a.num_slots, head_groups};
  cfg.numAttrs = pdl;
  if (small) {
    cfg.gridDim = dim3(static_cast<unsigned>(groups));
    cfg.blockDim = dim3(kDecodeWarps * 32);
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, decode_merge_kernel<D, QT, kTokenV>, cp));
    return;
  }
  cfg.gridDim = dim3(static_cast<unsigned>(a.batch * a.q_heads));
  cfg.blockDim = dim3(kCombineThreads);
  cfg.dynamicSmemBytes =
      sizeof(float) * (static_cast<size_t>(combine_weights_floats(a.splits)) + 4 * kCombineThreads);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, decode_combine_kernel<QT, kTokenV>, cp));
}

// Blocks of the write kernel per sequence: enough for every row, never more than fill the device about twice.
inline dim3 append_grid(int64_t batch, int64_t kv_heads, int64_t new_tokens) {
  const int64_t rows = 2 * kv_heads * new_tokens;
  const int64_t fill = ceil_div(2 * static_cast<int64_t>(sm_count()) * 8, batch);
  const unsigned bx = static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(rows, kAppendWarps), fill)));
  return dim3(bx, static_cast<unsigned>(batch));
}

// A write's kernel parameters, INT8 and INT4 alike.
inline AppendParams append_params(const AppendArgs& a) {
  return AppendParams{a.k, a.v, a.counts, a.k_cache, a.v_cache, a.k_scales, a.v_scales, a.lengths,
                      a.arrivals, a.saturated, a.kv_heads, a.new_tokens, a.max_tokens, a.block_tables,
                      a.seq_ids, a.clamped, a.num_pages, a.max_pages, a.num_slots, a.page_size};
}

// The INT4 formats' split plan and launch, contiguous or paged (kPaged): kernels/decode_int4.cu
// instantiates the contiguous ones, kernels/decode_int4_paged.cu the paged ones.
template <bool kPaged>
int plan_splits_int4(int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t max_tokens, int head_dim,
                     c10::ScalarType dtype, bool per_token, int group) {
  int splits = 1;
  dispatch_decode_int4(head_dim, group, dtype, per_token, [&](auto d, auto g, auto qt, auto kg) {
    splits = plan_splits(split_kernel<decltype(d)::value, typename decltype(qt)::type, decltype(kg)::value, kPaged,
                                      decltype(g)::value>(),
                         batch, q_heads, kv_heads, max_tokens);
  });
  return splits;
}

template <bool kPaged>
void launch_decode_int4(const DecodeArgs& a) {
  dispatch_decode_int4(a.head_dim, a.group, a.dtype, a.per_token, [&](auto d, auto g, auto qt, auto kg) {
    launch_decode<decltype(d)::value, typename decltype(qt)::type, decltype(kg)::value, kPaged, decltype(g)::value>(a);
  });
}

}  // namespace
}  // namespace cuda
}  // namespace kvpack
