// Variant "fast" (ours, beyond the paper): for each dtype and row length the kernel that measured
// fastest on the H100 (tools/lab/quant_lab.cu; the tables are in tools/lab/NOTES.md), every one
// bit-identical to the reference.
//
// Quantize (launch_quantize_fast says which runs when):
//   - the row kernel: a thread owns C consecutive columns of every row it visits (fp32: 16, four
//     16-byte loads and one 16-byte int8 store; fp16 / bf16: 8, one 16-byte load and an 8-byte
//     store), several rows in flight, so every warp access is one contiguous range. It converts with
//     the reciprocal form of quant_math.h: the per-channel reciprocals 1 / s are computed once per
//     thread and kept in registers (per token: one per row), each element costs a multiply and a few
//     adds instead of an IEEE division and an F2I conversion, and the rare element near a rounding
//     tie (1 in 8000 on uniform fp32 data, 1 in 340 on uniform bf16, whose absmax is exactly 1) is
//     decided by quantize_flagged's residual test. The division made the 16-bit quantize
//     compute-bound (70% of the copy bandwidth at 131072 x 8192 fp16; 94% with reciprocals).
//   - for fp32 rows below 8192: the vectorized kernel (kvpack/vectorized_kernel.cuh) with streaming
//     loads; fp32 is memory-bound, and its one row per thread and full grid beat the row kernel there.
//
// Dequantize. A thread owns 4 consecutive columns (one 4-byte int8 load, one 16-byte fp32 or 8-byte
// fp16 / bf16 store per row), one row in flight for fp32 and two for 16-bit outputs, one short block
// per 256 threads' rows (a one-pass grid). The 16-bit case was the paper's vectorized kernel's weak
// point (84% of copy; this reaches 97%).
//
// Requirements of these paths: D % C == 0 (quantize; 4 for the vectorized kernel) or D % 4 == 0
// (dequantize) and every row aligned to its access width. Anything else (odd D, a storage offset, a
// slice) takes the flat path of flat_kernel.cuh: correct for any input.
#include "kvpack/cuda_utils.cuh"
#include "kvpack/flat_kernel.cuh"
#include "kvpack/vectorized_kernel.cuh"

namespace kvpack {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // per block

// ---- quantize ---------------------------------------------------------------------------------

// Columns per thread per row: 16 for fp32 (four 16-byte loads, one 16-byte int8 store), 8 for
// fp16 / bf16 (one 16-byte load, an 8-byte store), with 2 and 4 rows in flight: 128 and 64 bytes of
// input per thread. The narrower 16-bit chunk needs fewer registers (8 reciprocals and scales
// instead of 16), so 3 blocks fit per SM.
template <typename T>
constexpr int quantize_chunk_cols() {
  return sizeof(T) == 4 ? 16 : 8;
}

template <typename T>
constexpr int quantize_rows_in_flight() {
  return sizeof(T) == 4 ? 2 : 4;
}

// Minimum resident blocks per SM promised to ptxas (a register cap: 128 and 80 registers). No fast
// kernel uses local memory (tools/check_cuda_compile.py checks the whole file for spills).
template <typename T>
constexpr int quantize_min_blocks() {
  return sizeof(T) == 4 ? 2 : 3;
}

// C int8 results as C / 4 32-bit words, stored with one 16- or 8-byte access.
template <int C>
struct QuantWords {
  uint32_t w[C / 4];
  __device__ __forceinline__ void store(int8_t* p) const {
    if constexpr (C == 16) {
      __stwb(reinterpret_cast<uint4*>(p), make_uint4(w[0], w[1], w[2], w[3]));
    } else {
      static_assert(C == 8, "8 or 16 columns per thread");
      __stwb(reinterpret_cast<uint2*>(p), make_uint2(w[0], w[1]));
    }
  }
};

// Four results into one word: the low byte of each of four 32-bit words of
// quantize_with_reciprocal_bits, gathered by byte permutes.
__device__ __forceinline__ uint32_t pack_low_bytes(uint32_t b0, uint32_t b1, uint32_t b2, uint32_t b3) {
  return __byte_perm(__byte_perm(b0, b1, 0x0040), __byte_perm(b2, b3, 0x4000), 0x7610);
}

template <typename T, bool kPerToken, int C>
__device__ __forceinline__ QuantWords<C> quantize_chunk(const VecN<T, C>& x, const float* recip, float row_recip,
                                                        const float* col_scales, float row_scale) {
  QuantWords<C> out;
  uint32_t flagged = 0;  // bit e: element e must be decided by quantize_flagged
#pragma unroll
  for (int g = 0; g < C / 4; ++g) {
    uint32_t b[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int e = 4 * g + j;
      bool flag = false;
      b[j] = quantize_with_reciprocal_bits(to_float(x.val[e]), kPerToken ? row_recip : recip[e], flag);
      flagged |= static_cast<uint32_t>(flag) << e;
    }
    out.w[g] = pack_low_bytes(b[0], b[1], b[2], b[3]);
  }
  if (flagged != 0) {  // rare: near a tie, or non-finite / extreme values or scales
#pragma unroll
    for (int e = 0; e < C; ++e) {
      if (flagged & (1u << e)) {  // a warp runs this body only for the e some lane flagged
        const float r = kPerToken ? row_recip : recip[e];
        const uint32_t q = static_cast<uint8_t>(quantize_flagged(to_float(x.val[e]), kPerToken ? row_scale : col_scales[e], r));
        const int shift = 8 * (e % 4);
        out.w[e / 4] = (out.w[e / 4] & ~(0xFFu << shift)) | (q << shift);
      }
    }
  }
  return out;
}

template <typename T, bool kPerToken, bool kStreaming>
__global__ void __launch_bounds__(kThreads, quantize_min_blocks<T>())
    quantize_fast_kernel(const T* __restrict__ in, const float* __restrict__ scales, int8_t* __restrict__ out,
                         int64_t rows, int64_t cols) {
  constexpr int C = quantize_chunk_cols<T>();
  constexpr int kU = quantize_rows_in_flight<T>();
  // 64-bit: column and row * cols offsets can exceed 2^31 on large matrices.
  const int64_t row_threads = cols / C;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= row_threads) return;  // no barrier in this kernel: idle threads may leave
  const int64_t col = t * C;
  // Per channel: the reciprocals, and for 16-bit inputs the scales too, held in registers across all
  // rows. quantize_flagged needs the scale of each flagged element; 16-bit data flags often (bf16
  // uniform: 1 element in 340, so most warp iterations have one) and re-reading the scale from
  // memory stalls the warp on a cache round trip. fp32 (1 in 8500) re-reads it, for want of registers.
  constexpr bool kKeepScales = sizeof(T) < 4;
  float recip[C];
  float col_scale[kKeepScales ? C : 1];
  if (!kPerToken) {
#pragma unroll
    for (int j = 0; j < C; ++j) {
      const float sj = scales[col + j];
      recip[j] = reciprocal_scale(sj);
      if (kKeepScales) col_scale[j] = sj;
    }
  }
  const int64_t row_stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  auto emit = [&](const VecN<T, C>& x, int64_t r) {
    const float row_scale = kPerToken ? scales[r] : 0.0f;
    quantize_chunk<T, kPerToken, C>(x, recip, kPerToken ? reciprocal_scale(row_scale) : 0.0f,
                                    kKeepScales ? col_scale : scales + col, row_scale)
        .store(out + r * cols + col);
  };
  for (; row + (kU - 1) * row_stride < rows; row += kU * row_stride) {
    VecN<T, C> x[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) x[u] = load_vec_hinted<T, C, kStreaming>(in + (row + u * row_stride) * cols + col);
#pragma unroll
    for (int u = 0; u < kU; ++u) emit(x[u], row + u * row_stride);
  }
  for (; row < rows; row += row_stride) emit(load_vec_hinted<T, C, kStreaming>(in + row * cols + col), row);
}

// ---- dequantize -------------------------------------------------------------------------------

constexpr int kDequantChunk = 4;  // columns per thread per row: one 4-byte int8 load

template <typename T>
constexpr int dequantize_rows_in_flight() {
  return sizeof(T) == 4 ? 1 : 2;
}

template <typename T, bool kPerToken>
__global__ void __launch_bounds__(kThreads)
    dequantize_fast_kernel(const int8_t* __restrict__ in, const float* __restrict__ scales, T* __restrict__ out,
                           int64_t rows, int64_t cols) {
  using Op = DequantizeOp<T>;
  constexpr int kU = dequantize_rows_in_flight<T>();
  const Op op;
  const int64_t row_threads = cols / kDequantChunk;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= row_threads) return;
  const int64_t col = t * kDequantChunk;
  float col_scale[kDequantChunk];
  if (!kPerToken) {
#pragma unroll
    for (int j = 0; j < kDequantChunk; ++j) col_scale[j] = scales[col + j];
  }
  const int64_t row_stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  auto emit = [&](const VecN<int8_t, kDequantChunk>& q, int64_t r) {
    const float row_scale = kPerToken ? scales[r] : 0.0f;
    VecN<T, kDequantChunk> y;
#pragma unroll
    for (int j = 0; j < kDequantChunk; ++j) y.val[j] = op(q.val[j], kPerToken ? row_scale : col_scale[j]);
    store_vec<T, kDequantChunk>(out + r * cols + col, y);
  };
  for (; row + (kU - 1) * row_stride < rows; row += kU * row_stride) {
    VecN<int8_t, kDequantChunk> q[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) q[u] = load_vec_streaming<int8_t, kDequantChunk>(in + (row + u * row_stride) * cols + col);
#pragma unroll
    for (int u = 0; u < kU; ++u) emit(q[u], row + u * row_stride);
  }
  for (; row < rows; row += row_stride) emit(load_vec_streaming<int8_t, kDequantChunk>(in + row * cols + col), row);
}

// ---- launch -----------------------------------------------------------------------------------

// Blocks of kThreads threads: x over a row's `row_threads` threads (up to kThreads; wider rows
// split across gridDim.x, balanced), y over several rows when the row is short, so a warp always
// sweeps contiguous memory. Rows: `row_blocks` blocks along y, capped at the grid's y limit (the
// kernels loop over rows with a grid stride).
struct RowGrid {
  dim3 grid, block;
};

inline RowGrid row_grid(int64_t row_threads, int64_t rows, int64_t rows_per_thread, int64_t max_row_blocks) {
  const int64_t col_blocks = ceil_div(row_threads, kThreads);
  const int64_t block_x = ceil_div(row_threads, col_blocks);
  const int64_t block_y = std::max<int64_t>(1, kThreads / block_x);
  const int64_t one_pass = ceil_div(rows, block_y * rows_per_thread);
  const int64_t row_blocks = std::max<int64_t>(1, std::min(one_pass, max_row_blocks));
  return {dim3(static_cast<unsigned int>(col_blocks), grid_y(row_blocks)),
          dim3(static_cast<unsigned int>(block_x), static_cast<unsigned int>(block_y))};
}

// Which kernel and cache hint, by dtype and row length, as measured on the H100 (% of the copy
// bandwidth, CUDA events, L2 read-flushed; tools/lab/NOTES.md has the tables):
//   fp32 is memory-bound even with the division. Below D = 8192 the vectorized kernel with streaming
//   loads wins (131072 x 256: 101.5, against 93 with plain loads and 88 for the row kernel; 131072
//   x 1024: 97.7); at D = 8192 the row kernel with plain loads on a grid of short blocks (101.9,
//   against 97 for the vectorized kernel and 82 for the row kernel with streaming loads).
//   fp16 / bf16 are compute-bound with the division (the vectorized kernel reaches 70%): the row
//   kernel with reciprocals on one wave of resident blocks, streaming loads below D = 2048
//   (131072 x 256 fp16: 89.6 against 84.0), plain at and above (131072 x 8192: 94.2 against 91.6).
constexpr int64_t kMinRowKernelColsFp32 = 8192;
constexpr int64_t kMinPlainLoadCols16 = 2048;

template <typename T, bool kPerToken, bool kStreaming>
void launch_quantize_rows(const ElementwiseArgs& a) {
  constexpr int C = quantize_chunk_cols<T>();
  constexpr int kU = quantize_rows_in_flight<T>();
  auto kernel = quantize_fast_kernel<T, kPerToken, kStreaming>;
  const int64_t row_threads = a.cols / C;
  const int64_t wave = static_cast<int64_t>(sm_count()) * blocks_per_sm(reinterpret_cast<const void*>(kernel), kThreads);
  const int64_t col_blocks = ceil_div(row_threads, kThreads);
  int64_t max_row_blocks;
  if constexpr (sizeof(T) == 4) {
    // short blocks: at most 4 iterations per thread, at least 8 waves
    const int64_t one_pass = ceil_div(a.rows, std::max<int64_t>(1, kThreads / row_threads) * kU);
    max_row_blocks = std::max(ceil_div(8 * wave, col_blocks), ceil_div(one_pass, 4));
  } else {
    max_row_blocks = std::max<int64_t>(1, wave / col_blocks);  // one wave
  }
  const RowGrid g = row_grid(row_threads, a.rows, kU, max_row_blocks);
  kernel<<<g.grid, g.block, 0, a.stream>>>(static_cast<const T*>(a.in), a.scales, static_cast<int8_t*>(a.out),
                                           a.rows, a.cols);
  KVPACK_LAUNCH_CHECK();
}

template <typename T, bool kPerToken>
void launch_quantize_fast(const ElementwiseArgs& a) {
  constexpr int C = quantize_chunk_cols<T>();
  const bool aligned = a.cols % C == 0 && is_aligned<16>(a.in) && is_aligned<C>(a.out);
  if (!aligned) {
    launch_flat<QuantizeOp<T>, kPerToken, 16 / sizeof(T)>(a);  // 16-byte input vectors
  } else if constexpr (sizeof(T) == 4) {
    if (a.cols < kMinRowKernelColsFp32) {
      launch_vectorized<QuantizeOp<T>, kPerToken, /*kStreaming=*/true>(a);
    } else {
      launch_quantize_rows<T, kPerToken, false>(a);
    }
  } else if (a.cols < kMinPlainLoadCols16) {
    launch_quantize_rows<T, kPerToken, true>(a);
  } else {
    launch_quantize_rows<T, kPerToken, false>(a);
  }
}

template <typename T, bool kPerToken>
void launch_dequantize_fast(const ElementwiseArgs& a) {
  const bool aligned = a.cols % kDequantChunk == 0 && is_aligned<4>(a.in) &&
                       is_aligned<alignof(VecN<T, kDequantChunk>)>(a.out);
  if (!aligned) {
    launch_flat<DequantizeOp<T>, kPerToken, 16>(a);  // 16-byte int8 vectors
    return;
  }
  // One pass: every thread converts dequantize_rows_in_flight rows (the grid's y limit aside).
  constexpr int kU = dequantize_rows_in_flight<T>();
  const RowGrid g = row_grid(a.cols / kDequantChunk, a.rows, kU, kMaxGridY);
  dequantize_fast_kernel<T, kPerToken><<<g.grid, g.block, 0, a.stream>>>(
      static_cast<const int8_t*>(a.in), a.scales, static_cast<T*>(a.out), a.rows, a.cols);
  KVPACK_LAUNCH_CHECK();
}

}  // namespace

void quantize_fast(const ElementwiseArgs& a) {
  KVPACK_DISPATCH_FLOAT_TYPES(a.dtype, "quantize_fast", [&] {
    dispatch_bool(a.per_token, [&](auto per_token) { launch_quantize_fast<scalar_t, decltype(per_token)::value>(a); });
  });
}

void dequantize_fast(const ElementwiseArgs& a) {
  KVPACK_DISPATCH_FLOAT_TYPES(a.dtype, "dequantize_fast", [&] {
    dispatch_bool(a.per_token, [&](auto per_token) { launch_dequantize_fast<scalar_t, decltype(per_token)::value>(a); });
  });
}

}  // namespace cuda
}  // namespace kvpack
