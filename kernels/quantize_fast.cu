// Variant "fast" (ours, beyond the paper): row kernels whose depth (rows loaded before the first is
// converted) and grid follow the device, every result bit-identical to the reference. How they were
// chosen: tools/lab/depth_lab.cu on the H200 (tools/lab/NOTES.md, "The H200"); the H100's earlier
// choices reached 80% of the copy on the H200, these 93-103% (fp32).
//
// Quantize: a thread owns 4 consecutive columns (fp32: one 16-byte load per row; fp16 / bf16: one
// 8-byte load) and a 4-byte int8 store, U rows loaded before any is converted. It converts with the
// reciprocal form of quant_math.h: the 4 reciprocals 1 / s are computed once per thread and kept in
// registers (per token: one per row), each element costs a multiply and a few adds instead of an IEEE
// division and an F2I conversion, and the rare element near a rounding tie (1 in 8000 on uniform fp32
// data, 1 in 340 on uniform bf16, whose absmax is exactly 1) is decided by quantize_flagged's residual
// test. Four columns, not 8 or 16: the 16-bit kernel is close to compute-bound, and with 4 columns
// it holds fewer registers (more warps resident) and its rare flagged pass is shorter (H200,
// 131072 x 8192 fp16: 93% of copy against 84% with 8 columns).
//   - U, the rows in flight: enough bytes in flight per SM to cover the device's loaded DRAM latency
//     at its peak bandwidth (Little's law; kvpack/cuda_utils.cuh, bytes_in_flight_per_sm): 4 when
//     that suffices at the kernel's occupancy, else 8. The H200 (36 GB/s per SM) needs 8; at 2 rows
//     in flight the same fp32 kernel reached 75-81% of copy.
//   - grid: fp32 is memory-bound: one pass (each thread its U rows once, a grid of many short
//     blocks that the hardware balances across the SMs; 94-103% against 91-97% for one persistent
//     wave). fp16 / bf16 do ~2x the arithmetic per byte: one wave of resident blocks, each thread
//     looping over rows, so that the 4 reciprocals (IEEE divisions) are paid once per thread.
//
// Dequantize. A thread owns C consecutive columns (fp32: 4, one 4-byte int8 load and a 16-byte store
// per row, 2 rows in flight, streaming loads; fp16 / bf16: 8, an 8-byte load and a 16-byte store, 4
// rows in flight), one pass. Its traffic is mostly stores (4 or 2 bytes out per byte in), which the
// in-flight rule for loads does not size; C and the rows were measured (H200: 91-96% of copy).
//
// Requirements of these paths: D % 4 == 0 (quantize, and fp32 dequantize) or D % 8 == 0 (16-bit
// dequantize) and every row aligned to its access width. Anything else (odd D, a storage offset, a
// slice) takes the flat path of flat_kernel.cuh: correct for any input.
#include <cstdlib>

#include "kvpack/cuda_utils.cuh"
#include "kvpack/flat_kernel.cuh"

namespace kvpack {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // per block

// ---- quantize ---------------------------------------------------------------------------------

constexpr int kQuantCols = 4;  // columns per thread per row: one 16- (fp32) or 8-byte load, a 4-byte store

// Four results into one word: the low byte of each of four 32-bit words of
// quantize_with_reciprocal_bits, gathered by byte permutes.
__device__ __forceinline__ uint32_t pack_low_bytes(uint32_t b0, uint32_t b1, uint32_t b2, uint32_t b3) {
  return __byte_perm(__byte_perm(b0, b1, 0x0040), __byte_perm(b2, b3, 0x4000), 0x7610);
}

// The 4 int8 results of one row chunk as one word. col_scales: the chunk's scales (per channel), for
// the flagged elements only.
template <typename T, bool kPerToken>
__device__ __forceinline__ uint32_t quantize_chunk(const VecN<T, kQuantCols>& x, const float* recip, float row_recip,
                                                   const float* col_scales, float row_scale) {
  uint32_t b[kQuantCols];
  uint32_t flagged = 0;  // bit e: element e must be decided by quantize_flagged
#pragma unroll
  for (int e = 0; e < kQuantCols; ++e) {
    bool flag = false;
    b[e] = quantize_with_reciprocal_bits(to_float(x.val[e]), kPerToken ? row_recip : recip[e], flag);
    flagged |= static_cast<uint32_t>(flag) << e;
  }
  uint32_t w = pack_low_bytes(b[0], b[1], b[2], b[3]);
  if (flagged != 0) {  // rare: near a tie, or non-finite / extreme values or scales
#pragma unroll
    for (int e = 0; e < kQuantCols; ++e) {
      if (flagged & (1u << e)) {  // a warp runs this body only for the e some lane flagged
        const float r = kPerToken ? row_recip : recip[e];
        const uint32_t q = static_cast<uint8_t>(quantize_flagged(to_float(x.val[e]), kPerToken ? row_scale : col_scales[e], r));
        w = (w & ~(0xFFu << (8 * e))) | (q << (8 * e));
      }
    }
  }
  return w;
}

template <typename T, bool kPerToken, int U>
__global__ void __launch_bounds__(kThreads)
    quantize_fast_kernel(const T* __restrict__ in, const float* __restrict__ scales, int8_t* __restrict__ out,
                         int64_t rows, int64_t cols) {
  // 64-bit: column and row * cols offsets can exceed 2^31 on large matrices.
  const int64_t row_threads = cols / kQuantCols;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= row_threads) return;  // no barrier in this kernel: idle threads may leave
  const int64_t col = t * kQuantCols;
  // Per channel: the reciprocals and the scales (quantize_flagged needs the scale of a flagged
  // element; 16-bit data flags often, and re-reading it from memory would stall the warp), held in
  // registers across all rows.
  float recip[kQuantCols], col_scale[kQuantCols];
  if (!kPerToken) {
#pragma unroll
    for (int j = 0; j < kQuantCols; ++j) {
      col_scale[j] = scales[col + j];
      recip[j] = reciprocal_scale(col_scale[j]);
    }
  }
  const int64_t row_stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  auto emit = [&](const VecN<T, kQuantCols>& x, int64_t r) {
    const float row_scale = kPerToken ? scales[r] : 0.0f;
    const uint32_t w = quantize_chunk<T, kPerToken>(x, recip, kPerToken ? reciprocal_scale(row_scale) : 0.0f,
                                                    col_scale, row_scale);
    __stwb(reinterpret_cast<unsigned int*>(out + r * cols + col), w);
  };
  for (; row + (U - 1) * row_stride < rows; row += U * row_stride) {
    VecN<T, kQuantCols> x[U];
#pragma unroll
    for (int u = 0; u < U; ++u) x[u] = load_vec<T, kQuantCols>(in + (row + u * row_stride) * cols + col);
#pragma unroll
    for (int u = 0; u < U; ++u) emit(x[u], row + u * row_stride);
  }
  for (; row < rows; row += row_stride) emit(load_vec<T, kQuantCols>(in + row * cols + col), row);
}

// ---- dequantize -------------------------------------------------------------------------------

template <typename T>
constexpr int dequantize_cols() {
  return sizeof(T) == 4 ? 4 : 8;
}

template <typename T>
constexpr int dequantize_rows_in_flight() {
  return sizeof(T) == 4 ? 2 : 4;
}

// Streaming loads (ld.global.cs) for the fp32 output (H200: 131072 x 256 91% against 88% plain),
// plain read-only loads for 16-bit outputs (88% against 85%).
template <typename T>
constexpr bool dequantize_streaming() {
  return sizeof(T) == 4;
}

template <typename T, bool kPerToken>
__global__ void __launch_bounds__(kThreads)
    dequantize_fast_kernel(const int8_t* __restrict__ in, const float* __restrict__ scales, T* __restrict__ out,
                           int64_t rows, int64_t cols) {
  using Op = DequantizeOp<T>;
  constexpr int C = dequantize_cols<T>();
  constexpr int kU = dequantize_rows_in_flight<T>();
  const Op op;
  const int64_t row_threads = cols / C;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= row_threads) return;
  const int64_t col = t * C;
  float col_scale[C];
  if (!kPerToken) {
#pragma unroll
    for (int j = 0; j < C; ++j) col_scale[j] = scales[col + j];
  }
  const int64_t row_stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  auto emit = [&](const VecN<int8_t, C>& q, int64_t r) {
    const float row_scale = kPerToken ? scales[r] : 0.0f;
    VecN<T, C> y;
#pragma unroll
    for (int j = 0; j < C; ++j) y.val[j] = op(q.val[j], kPerToken ? row_scale : col_scale[j]);
    store_vec<T, C>(out + r * cols + col, y);
  };
  constexpr bool kStreaming = dequantize_streaming<T>();
  for (; row + (kU - 1) * row_stride < rows; row += kU * row_stride) {
    VecN<int8_t, C> q[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) q[u] = load_vec_hinted<int8_t, C, kStreaming>(in + (row + u * row_stride) * cols + col);
#pragma unroll
    for (int u = 0; u < kU; ++u) emit(q[u], row + u * row_stride);
  }
  for (; row < rows; row += row_stride) emit(load_vec_hinted<int8_t, C, kStreaming>(in + row * cols + col), row);
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

// KVPACK_QUANTIZE_ROWS_IN_FLIGHT=4 or 8 overrides the choice below, read once per process: to test
// both instantiations on any device, and to tune by hand. kvpack.ops refuses any other value before
// the extension loads.
inline int rows_in_flight_override() {
  static const int value = [] {
    const char* e = std::getenv("KVPACK_QUANTIZE_ROWS_IN_FLIGHT");
    const int n = e == nullptr ? 0 : std::atoi(e);
    return n == 4 || n == 8 ? n : 0;
  }();
  return value;
}

// Rows in flight for the quantize kernel of T on this device: 4 if the kernel at 4 keeps the bytes
// in flight per SM that the device needs (bytes_in_flight_per_sm), else 8.
template <typename T, bool kPerToken>
int quantize_rows_in_flight() {
  if (rows_in_flight_override() != 0) return rows_in_flight_override();
  const int resident_threads = blocks_per_sm(reinterpret_cast<const void*>(quantize_fast_kernel<T, kPerToken, 4>), kThreads) * kThreads;
  const int64_t at4 = static_cast<int64_t>(resident_threads) * 4 * kQuantCols * sizeof(T);
  return at4 >= bytes_in_flight_per_sm() ? 4 : 8;
}

// fp32 is memory-bound: one pass. fp16 / bf16: one wave of resident blocks (see the top of the file).
template <typename T>
constexpr bool quantize_one_pass() {
  return sizeof(T) == 4;
}

template <typename T, bool kPerToken, int U>
void launch_quantize_rows(const ElementwiseArgs& a) {
  auto kernel = quantize_fast_kernel<T, kPerToken, U>;
  const int64_t row_threads = a.cols / kQuantCols;
  int64_t max_row_blocks = kMaxGridY;
  if constexpr (!quantize_one_pass<T>()) {
    const int64_t wave = static_cast<int64_t>(sm_count()) * blocks_per_sm(reinterpret_cast<const void*>(kernel), kThreads);
    max_row_blocks = std::max<int64_t>(1, wave / ceil_div(row_threads, kThreads));
  }
  const RowGrid g = row_grid(row_threads, a.rows, U, max_row_blocks);
  kernel<<<g.grid, g.block, 0, a.stream>>>(static_cast<const T*>(a.in), a.scales, static_cast<int8_t*>(a.out),
                                           a.rows, a.cols);
  KVPACK_LAUNCH_CHECK();
}

template <typename T, bool kPerToken>
void launch_quantize_fast(const ElementwiseArgs& a) {
  const bool aligned = a.cols % kQuantCols == 0 && is_aligned<alignof(VecN<T, kQuantCols>)>(a.in) && is_aligned<4>(a.out);
  if (!aligned) {
    launch_flat<QuantizeOp<T>, kPerToken, 16 / sizeof(T)>(a);  // 16-byte input vectors
  } else if (quantize_rows_in_flight<T, kPerToken>() == 4) {
    launch_quantize_rows<T, kPerToken, 4>(a);
  } else {
    launch_quantize_rows<T, kPerToken, 8>(a);
  }
}

template <typename T, bool kPerToken>
void launch_dequantize_fast(const ElementwiseArgs& a) {
  constexpr int C = dequantize_cols<T>();
  const bool aligned = a.cols % C == 0 && is_aligned<C>(a.in) && is_aligned<alignof(VecN<T, C>)>(a.out);
  if (!aligned) {
    launch_flat<DequantizeOp<T>, kPerToken, 16>(a);  // 16-byte int8 vectors
    return;
  }
  // One pass: every thread converts dequantize_rows_in_flight rows (the grid's y limit aside).
  const RowGrid g = row_grid(a.cols / C, a.rows, dequantize_rows_in_flight<T>(), kMaxGridY);
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

FastTuning fast_tuning() {
  FastTuning t;
  const DeviceMemory& m = device_memory();
  t.sm_count = sm_count();
  t.peak_gbps = m.peak_gbps;
  t.bytes_in_flight_per_sm = bytes_in_flight_per_sm();
  t.quantize_rows_in_flight[0] = quantize_rows_in_flight<float, false>();
  t.quantize_rows_in_flight[1] = quantize_rows_in_flight<__half, false>();
  t.quantize_rows_in_flight[2] = quantize_rows_in_flight<__nv_bfloat16, false>();
  t.quantize_blocks_per_sm[0] = blocks_per_sm(reinterpret_cast<const void*>(quantize_fast_kernel<float, false, 8>), kThreads);
  t.quantize_blocks_per_sm[1] = blocks_per_sm(reinterpret_cast<const void*>(quantize_fast_kernel<__half, false, 8>), kThreads);
  t.quantize_blocks_per_sm[2] = blocks_per_sm(reinterpret_cast<const void*>(quantize_fast_kernel<__nv_bfloat16, false, 8>), kThreads);
  return t;
}

}  // namespace cuda
}  // namespace kvpack
