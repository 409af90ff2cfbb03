// GPU scales: absmax / 127 per channel (over the T rows of each column) or per token (over the D
// columns of each row), and the fused entry point (scales, then a variant's quantize kernel).
//
// Max is exact and order-free, so any reduction order gives the reference's bits; the one
// arithmetic step, absmax / 127, is quant_math.h's scale_from_absmax.  An all-zero column or row
// gets scale 0 (quantizes to 0, dequantizes to 0). Every max, of elements and of partial maxima
// (shared memory, shuffles), is quant_math.h's absmax_combine, which keeps NaN and inf where fmaxf
// would drop a NaN: a column (row) holding a NaN gets a NaN scale, one holding an inf an inf scale,
// and kvpack.ops finds non-finite input by checking the scales alone.
//
// Per channel (a column-wise reduction over row-major data), in one kernel after a memset of the
// output: blocks combine their rows' partial maxima in shared memory, then one atomicMax per column
// and block merges the blocks. The atomics act on the *scale's* bits as an unsigned int: absmax /
// 127 in IEEE arithmetic is monotonic in absmax, so the max of the blocks' scales is the scale of the
// max, and for non-negative floats the unsigned order of the bit patterns is the numeric order.
// That order puts +inf above every finite scale and every NaN with the sign bit clear (absmax_combine
// clears it, and NaN / 127 is the input's NaN or the canonical 0x7FFFFFFF) above +inf, so the
// merge keeps a block's NaN or inf scale whatever the other blocks hold.
// (The earlier version merged absmax bits and needed a third launch to divide.)
//   - D a multiple of the 16-byte vector and x aligned: 1024-thread blocks, each thread 16 bytes of
//     consecutive columns (4 fp32 / 8 fp16), 8 rows in flight, one wave of resident blocks but at
//     most 128 row blocks per column block unless the rows are many: short blocks pay their tree
//     and same-address atomics for little data (H100, 131072 x 256: 1056 row blocks 63% of copy;
//     128 row blocks 98% at 131072 x 1024). On the H200 (tools/lab/depth_lab.cu) no merge reaches
//     90% at D <= 256 in 16 bits: 131072 x 256 fp16 is 64 MB, 15 us at the copy rate, and the best
//     kernel takes 28 us; without any merge (plain stores, a wrong result) 22 us.
//   - anything else: 32 x 8 blocks, a warp on 32 neighbouring columns of one row (coalesced 4-byte
//     loads), 8 rows in flight.
//
// Per token (a row-wise reduction): one warp per row, lanes striding the row (coalesced), 4 loads
// in flight, warp shuffles to combine; a persistent grid of warps walks the rows.
#include "kvpack/cuda_utils.cuh"

namespace kvpack {
namespace cuda {
namespace {

constexpr int kColsPerBlock = 32;  // blockDim.x: a warp's columns
constexpr int kRowsPerBlock = 8;   // blockDim.y
constexpr int kInFlight = 8;       // per channel: independent loads per thread, then combined
constexpr int kTokenInFlight = 4;  // per token: loads per lane in flight

constexpr int kVecThreads = 1024;   // vector per-channel kernel: threads per block
constexpr int kVecInFlight = 8;     // its rows in flight per thread
constexpr int64_t kMaxRowBlocks = 128;  // its row blocks per column block (atomics per address) ...
constexpr int64_t kMinBatches = 32;     // ... unless every thread still has this many batches of rows

// Merges a block's maximum |x| of one column into the column's scale.
__device__ __forceinline__ void merge_scale(float* scale, float absmax) {
  atomicMax(reinterpret_cast<unsigned int*>(scale), __float_as_uint(scale_from_absmax(absmax)));
}

template <typename T>
__global__ void __launch_bounds__(kVecThreads)
    absmax_channel_vec_kernel(const T* __restrict__ x, float* __restrict__ scales, int64_t rows, int64_t cols) {
  constexpr int V = 16 / sizeof(T);  // columns per thread: one 16-byte load per row
  __shared__ float partial[V][kVecThreads];
  const int64_t row_threads = cols / V;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float m[V];
#pragma unroll
  for (int j = 0; j < V; ++j) m[j] = 0.0f;
  if (t < row_threads) {  // no early return: every thread reaches the barrier below
    const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
    int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
    for (; row + (kVecInFlight - 1) * stride < rows; row += kVecInFlight * stride) {
      VecN<T, V> v[kVecInFlight];
#pragma unroll
      for (int u = 0; u < kVecInFlight; ++u) v[u] = load_vec_streaming<T, V>(x + (row + u * stride) * cols + t * V);
#pragma unroll
      for (int u = 0; u < kVecInFlight; ++u)
#pragma unroll
        for (int j = 0; j < V; ++j) m[j] = absmax_combine(m[j], to_float(v[u].val[j]));
    }
    for (; row < rows; row += stride) {
      const VecN<T, V> v = load_vec_streaming<T, V>(x + row * cols + t * V);
#pragma unroll
      for (int j = 0; j < V; ++j) m[j] = absmax_combine(m[j], to_float(v.val[j]));
    }
  }
  // The block's rows into row 0: a tree over threadIdx.y in shared memory (log2(blockDim.y) steps;
  // a serial loop in row 0 took ~4 us of a 40 us kernel at D = 256 fp16, 32 rows x 8 columns).
  if (blockDim.y > 1) {  // uniform per block
    const int ty = threadIdx.y;
    const int tid = ty * blockDim.x + threadIdx.x;
#pragma unroll
    for (int j = 0; j < V; ++j) partial[j][tid] = m[j];
    __syncthreads();
    for (int n = blockDim.y; n > 1;) {  // rows [0, n) hold partial maxima
      const int half = (n + 1) / 2;
      if (ty < half && ty + half < n) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          m[j] = absmax_combine(m[j], partial[j][tid + half * blockDim.x]);
          partial[j][tid] = m[j];
        }
      }
      __syncthreads();
      n = half;
    }
  }
  if (threadIdx.y == 0 && t < row_threads) {
#pragma unroll
    for (int j = 0; j < V; ++j) merge_scale(scales + t * V + j, m[j]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kColsPerBlock* kRowsPerBlock)
    absmax_channel_kernel(const T* __restrict__ x, float* __restrict__ scales, int64_t rows, int64_t cols) {
  __shared__ float partial[kRowsPerBlock][kColsPerBlock + 1];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  // 64-bit: row * cols can exceed 2^31 on large matrices.
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColsPerBlock + tx;
  float m = 0.0f;
  if (col < cols) {
    const int64_t stride = static_cast<int64_t>(gridDim.y) * kRowsPerBlock;
    int64_t row = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock + ty;
    for (; row + (kInFlight - 1) * stride < rows; row += kInFlight * stride) {
      float v[kInFlight];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) v[u] = to_float(x[(row + u * stride) * cols + col]);
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) m = absmax_combine(m, v[u]);
    }
    for (; row < rows; row += stride) m = absmax_combine(m, to_float(x[row * cols + col]));
  }
  partial[ty][tx] = m;
  __syncthreads();
  if (ty == 0 && col < cols) {
#pragma unroll
    for (int k = 1; k < kRowsPerBlock; ++k) m = absmax_combine(m, partial[k][tx]);
    merge_scale(scales + col, m);
  }
}

template <typename T>
__global__ void __launch_bounds__(256)
    absmax_token_kernel(const T* __restrict__ x, float* __restrict__ scales, int64_t rows,
                        int64_t cols) {
  const int lane = threadIdx.x % 32;
  const int64_t warps_per_block = blockDim.x / 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * warps_per_block;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / 32;
       row < rows; row += stride) {  // uniform per warp: the shuffles below see all 32 lanes
    const T* xr = x + row * cols;  // 64-bit offset
    float m = 0.0f;
    int64_t d = lane;
    for (; d + (kTokenInFlight - 1) * 32 < cols; d += kTokenInFlight * 32) {
      float v[kTokenInFlight];
#pragma unroll
      for (int u = 0; u < kTokenInFlight; ++u) v[u] = to_float(xr[d + u * 32]);
#pragma unroll
      for (int u = 0; u < kTokenInFlight; ++u) m = absmax_combine(m, v[u]);
    }
    for (; d < cols; d += 32) m = absmax_combine(m, to_float(xr[d]));
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) m = absmax_combine(m, __shfl_xor_sync(0xffffffffu, m, offset));
    if (lane == 0) scales[row] = scale_from_absmax(m);
  }
}

template <typename T>
void launch_scales(const T* x, float* scales, int64_t rows, int64_t cols, bool per_token,
                   cudaStream_t stream) {
  if (per_token) {
    constexpr int kThreads = 256;
    constexpr int kWarps = kThreads / 32;
    auto kernel = absmax_token_kernel<T>;
    const unsigned int grid = persistent_grid(kernel, kThreads, ceil_div(rows, kWarps));
    kernel<<<grid, kThreads, 0, stream>>>(x, scales, rows, cols);
    KVPACK_LAUNCH_CHECK();
    return;
  }
  C10_CUDA_CHECK(cudaMemsetAsync(scales, 0, static_cast<size_t>(cols) * sizeof(float), stream));
  constexpr int V = 16 / sizeof(T);
  if (cols % V == 0 && is_aligned<16>(x)) {
    auto kernel = absmax_channel_vec_kernel<T>;
    const int64_t row_threads = cols / V;
    const int64_t col_blocks = ceil_div(row_threads, kVecThreads);
    const int64_t block_x = ceil_div(row_threads, col_blocks);
    const int64_t block_y = std::max<int64_t>(1, kVecThreads / block_x);
    const int64_t wave = static_cast<int64_t>(sm_count()) *
                         blocks_per_sm(reinterpret_cast<const void*>(kernel), static_cast<int>(block_x * block_y));
    // One wave of resident blocks, but past kMaxRowBlocks per column strip only while each thread
    // still has kMinBatches batches of rows: a short block pays its tree and its atomics for little
    // data (H200, 131072 x 1024 fp32: 128 row blocks 99%, 256: 96%; 131072 x 8192 fp16, 256
    // threads' rows per block: 256 row blocks 99%, 128: 89%).
    const int64_t batches = ceil_div(rows, block_y * kVecInFlight);
    const int64_t cap = std::max<int64_t>(kMaxRowBlocks, batches / kMinBatches);
    const int64_t row_blocks = std::min({std::max<int64_t>(1, wave / col_blocks), cap, batches});
    const dim3 grid(static_cast<unsigned int>(col_blocks), grid_y(row_blocks));
    const dim3 block(static_cast<unsigned int>(block_x), static_cast<unsigned int>(block_y));
    kernel<<<grid, block, 0, stream>>>(x, scales, rows, cols);
    KVPACK_LAUNCH_CHECK();
    return;
  }
  auto kernel = absmax_channel_kernel<T>;
  const int64_t col_blocks = ceil_div(cols, kColsPerBlock);
  const int64_t wave = static_cast<int64_t>(sm_count()) *
                       blocks_per_sm(reinterpret_cast<const void*>(kernel), kColsPerBlock * kRowsPerBlock);
  // Row strips: as many as fit the device in one wave (rounded down: every block of this kernel
  // does the same work, so a second, partial wave would cost as much as the first), each strip at
  // least kInFlight rows per thread.
  const int64_t row_blocks = std::min(std::max<int64_t>(1, wave / col_blocks),
                                      ceil_div(rows, kRowsPerBlock * kInFlight));
  const dim3 grid(static_cast<unsigned int>(col_blocks), grid_y(row_blocks));
  const dim3 block(kColsPerBlock, kRowsPerBlock);
  kernel<<<grid, block, 0, stream>>>(x, scales, rows, cols);
  KVPACK_LAUNCH_CHECK();
}

}  // namespace

void compute_scales(const void* x, float* scales, int64_t rows, int64_t cols,
                    c10::ScalarType dtype, bool per_token, cudaStream_t stream) {
  KVPACK_DISPATCH_FLOAT_TYPES(dtype, "compute_scales", [&] {
    launch_scales(static_cast<const scalar_t*>(x), scales, rows, cols, per_token, stream);
  });
}

void quantize_fused(const ElementwiseArgs& args, float* scales, ElementwiseLauncher quantize) {
  compute_scales(args.in, scales, args.rows, args.cols, args.dtype, args.per_token, args.stream);
  ElementwiseArgs with_scales = args;
  with_scales.scales = scales;
  quantize(with_scales);  // same stream: runs after the scales are written
}

}  // namespace cuda
}  // namespace kvpack
