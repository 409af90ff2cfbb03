// Variant "fast" (ours, beyond the paper): a row-striding, vector-access kernel built for bandwidth.
//
// Work unit: 16 elements of one row per thread per row visited, i.e. 16 bytes of int8, moved in
// 16-byte accesses on the wide side (fp32 / fp16 / bf16) and 4-16-byte accesses on the int8 side.
//
// Layout: a row of D = 16 * C elements is cut into groups of G consecutive elements, G = 16 bytes
// of the wider type (fp32: 4, fp16/bf16: 8); thread t of the row (0 <= t < C) owns groups t, t + C,
// t + 2C, ... (16 / G of them). For each group index k the threads of a warp touch consecutive
// groups, so every load and every store instruction is fully coalesced: quantize fp32 = 4 x 16-byte
// loads + 4 x 4-byte stores per thread, each one a contiguous 512-byte / 128-byte warp access;
// dequantize fp32 = 4 x 4-byte loads + 4 x 16-byte stores. The contiguous layout has G = 16: each
// thread's 16 elements contiguous, one 16-byte int8 access and four 16-byte accesses 64 bytes apart
// per lane on the wide side. Quantize uses the contiguous layout, dequantize the interleaved one
// (see launch_fast; KVPACK_FAST_LAYOUT=interleaved|contiguous forces one for both).
//
// Threads: thread (x, y) of block (bx, by) is row-thread t = bx * blockDim.x + x of every row it
// visits, starting at row by * blockDim.y + y with a stride of gridDim.y * blockDim.y rows. A
// thread's columns never change, so a per-channel thread loads its 16 scales once and keeps them in
// registers for all its rows; a per-token thread reads one scale per row (an L1 broadcast).
// blockDim.x covers the C row-threads (up to 256; wider rows split across gridDim.x) and
// blockDim.y packs several rows per block when D is small, so warps always sweep contiguous memory.
//
// Bandwidth: each thread issues the loads of kU rows (128 bytes of input per thread for quantize
// fp32) before converting any; the grid covers the matrix in one to four such iterations per thread
// (launch_fast_layout), many short blocks rather than one persistent wave.
//
// Requirements of this path: D % 16 == 0 and x, q (or q, x_hat) 16-byte aligned, so every group
// of every row is aligned to its access width. Anything else (D % 16 != 0, a storage offset, a
// slice) takes the flat path of flat_kernel.cuh with 16-byte input vectors: correct for any input.
#include <cstdlib>
#include <string>

#include "kvpack/cuda_utils.cuh"
#include "kvpack/flat_kernel.cuh"

namespace kvpack {
namespace cuda {
namespace {

constexpr int kChunk = 16;     // elements per thread per row visited: 16 bytes of int8
constexpr int kThreads = 256;  // per block

// Independent rows a thread loads before it converts: ~128 bytes of input in flight per thread.
template <typename Op>
constexpr int rows_in_flight() {
  return sizeof(typename Op::In) * kChunk >= 64 ? 2 : 4;
}

// Elements per group: 16 bytes of the wider of In and Out.
template <typename Op>
constexpr int interleaved_group() {
  return 16 / (sizeof(typename Op::In) > sizeof(typename Op::Out) ? sizeof(typename Op::In)
                                                                     : sizeof(typename Op::Out));
}

// Minimum resident blocks per SM promised to ptxas (__launch_bounds__), i.e. a register cap: 3
// (80 registers) for dequantize, 2 (128) for quantize, whose 16 scales, 4 rows of 16 fp16 inputs
// and division subroutine need ~90. Without a hint ptxas picked 64-80 registers and spilled
// (sm_90, nvcc 13.0); with these no fast kernel uses local memory (tools/check_cuda_compile.py
// checks it).
template <typename Op>
constexpr int min_blocks_per_sm() {
  return sizeof(typename Op::In) == 1 ? 3 : 2;
}

template <typename Op, bool kPerToken, int kGroup>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm<Op>())
    elementwise_fast_kernel(const typename Op::In* __restrict__ in,
                            const float* __restrict__ scales, typename Op::Out* __restrict__ out,
                            int64_t rows, int64_t cols) {
  using In = typename Op::In;
  using Out = typename Op::Out;
  static_assert(kChunk % kGroup == 0, "a thread's 16 elements are whole groups");
  constexpr int kGroups = kChunk / kGroup;
  constexpr int kU = rows_in_flight<Op>();
  const Op op;
  // 64-bit: column and row * cols offsets can exceed 2^31 on large matrices.
  const int64_t row_threads = cols / kChunk;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= row_threads) return;  // no barrier in this kernel: idle threads may leave

  int64_t col[kGroups];  // first column of each of this thread's groups
#pragma unroll
  for (int k = 0; k < kGroups; ++k) col[k] = (t + k * row_threads) * kGroup;

  float col_scale[kGroups][kGroup];  // per channel: held in registers across all rows
  if (!kPerToken) {
#pragma unroll
    for (int k = 0; k < kGroups; ++k) {
#pragma unroll
      for (int j = 0; j < kGroup; ++j) col_scale[k][j] = scales[col[k] + j];
    }
  }

  const int64_t row_stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;

  // Main loop: kU rows per iteration, all loads issued before the first conversion.
  for (; row + (kU - 1) * row_stride < rows; row += kU * row_stride) {
    VecN<In, kGroup> x[kU][kGroups];
    float row_scale[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t base = (row + u * row_stride) * cols;
#pragma unroll
      for (int k = 0; k < kGroups; ++k) x[u][k] = load_vec<In, kGroup>(in + base + col[k]);
      row_scale[u] = kPerToken ? scales[row + u * row_stride] : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t base = (row + u * row_stride) * cols;
#pragma unroll
      for (int k = 0; k < kGroups; ++k) {
        VecN<Out, kGroup> y;
#pragma unroll
        for (int j = 0; j < kGroup; ++j)
          y.val[j] = op(x[u][k].val[j], kPerToken ? row_scale[u] : col_scale[k][j]);
        store_vec<Out, kGroup>(out + base + col[k], y);
      }
    }
  }
  // Remainder: fewer than kU rows left for this thread.
  for (; row < rows; row += row_stride) {
    const int64_t base = row * cols;
    const float row_scale = kPerToken ? scales[row] : 0.0f;
#pragma unroll
    for (int k = 0; k < kGroups; ++k) {
      const VecN<In, kGroup> x = load_vec<In, kGroup>(in + base + col[k]);
      VecN<Out, kGroup> y;
#pragma unroll
      for (int j = 0; j < kGroup; ++j)
        y.val[j] = op(x.val[j], kPerToken ? row_scale : col_scale[k][j]);
      store_vec<Out, kGroup>(out + base + col[k], y);
    }
  }
}

// Layout per op. Measured on the H100 (131072 x 8192 fp32, % of the copy ceiling): quantize
// contiguous 98.3 / interleaved 97.1; dequantize interleaved 89.3 / contiguous 41.1 (there each
// lane's four 16-byte fp32 stores are 64 bytes apart, so a warp store instruction spreads over
// 2 KB). Default: quantize contiguous (one 16-byte int8 store per lane, a 512-byte warp store),
// dequantize interleaved (every wide store a contiguous 512-byte warp access).
// KVPACK_FAST_LAYOUT=interleaved or =contiguous forces one layout for both ops (tests, benchmarks).
enum class Layout { kAuto, kInterleaved, kContiguous };

inline Layout layout_override() {
  static const Layout layout = [] {
    const char* v = std::getenv("KVPACK_FAST_LAYOUT");
    if (v == nullptr) return Layout::kAuto;
    const std::string s(v);
    if (s == "contiguous") return Layout::kContiguous;
    if (s == "interleaved") return Layout::kInterleaved;
    return Layout::kAuto;
  }();
  return layout;
}

template <typename Op>
bool use_contiguous_layout() {
  const Layout l = layout_override();
  if (l != Layout::kAuto) return l == Layout::kContiguous;
  return sizeof(typename Op::In) > sizeof(typename Op::Out);  // quantize: contiguous
}

template <typename Op, bool kPerToken, int kGroup>
void launch_fast_layout(const ElementwiseArgs& a) {
  using In = typename Op::In;
  using Out = typename Op::Out;
  const int64_t row_threads = a.cols / kChunk;
  const int64_t col_blocks = ceil_div(row_threads, kThreads);
  const int64_t block_x = ceil_div(row_threads, col_blocks);  // <= kThreads, balanced
  const int64_t block_y = std::max<int64_t>(1, kThreads / block_x);
  const int threads = static_cast<int>(block_x * block_y);
  auto kernel = elementwise_fast_kernel<Op, kPerToken, kGroup>;
  // Grid: as many blocks as give each thread one main-loop iteration (kU rows), i.e. the whole
  // matrix in one pass of short blocks the hardware balances across the SMs (no tail of a
  // one-wave persistent grid, full parallelism on small matrices: 131072 x 128 is 2048 blocks);
  // capped at 4 iterations per thread once that is still >= 8 waves, to amortize the per-channel
  // scale loads on large matrices. The kernel keeps its grid-stride loop, so any cap is correct.
  constexpr int kU = rows_in_flight<Op>();
  const int64_t wave = static_cast<int64_t>(sm_count()) *
                       blocks_per_sm(reinterpret_cast<const void*>(kernel), threads);
  const int64_t one_pass = ceil_div(a.rows, block_y * kU);
  const int64_t cap = std::max(ceil_div(8 * wave, col_blocks), ceil_div(one_pass, 4));
  const int64_t row_blocks = std::max<int64_t>(1, std::min(one_pass, cap));
  const dim3 grid(static_cast<unsigned int>(col_blocks), grid_y(row_blocks));
  const dim3 block(static_cast<unsigned int>(block_x), static_cast<unsigned int>(block_y));
  kernel<<<grid, block, 0, a.stream>>>(static_cast<const In*>(a.in), a.scales,
                                       static_cast<Out*>(a.out), a.rows, a.cols);
  KVPACK_LAUNCH_CHECK();
}

template <typename Op, bool kPerToken>
void launch_fast(const ElementwiseArgs& a) {
  using In = typename Op::In;
  const bool aligned = a.cols % kChunk == 0 && is_aligned<16>(a.in) && is_aligned<16>(a.out);
  if (!aligned) {
    launch_flat<Op, kPerToken, 16 / sizeof(In)>(a);  // 16-byte input vectors
  } else if (use_contiguous_layout<Op>()) {
    launch_fast_layout<Op, kPerToken, kChunk>(a);
  } else {
    launch_fast_layout<Op, kPerToken, interleaved_group<Op>()>(a);
  }
}

}  // namespace

void quantize_fast(const ElementwiseArgs& a) {
  dispatch_elementwise<QuantizeOp>(a, "quantize_fast", [&](auto op, auto per_token) {
    launch_fast<typename decltype(op)::type, decltype(per_token)::value>(a);
  });
}

// Dequantize: unless a layout is forced, "fast" takes the vectorized kernel (char4 load, float4
// store, one full grid). Measured on the H100 at 131072 x 8192 fp32 it reached 96.7% of the copy
// bandwidth, against 91.9% for the row-striding kernel below (interleaved) and 41% (contiguous):
// the best measured kernel for each op is what "fast" means.
void dequantize_fast(const ElementwiseArgs& a) {
  if (layout_override() == Layout::kAuto) {
    dequantize_vectorized(a);
    return;
  }
  dispatch_elementwise<DequantizeOp>(a, "dequantize_fast", [&](auto op, auto per_token) {
    launch_fast<typename decltype(op)::type, decltype(per_token)::value>(a);
  });
}

}  // namespace cuda
}  // namespace kvpack
