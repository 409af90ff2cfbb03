// Variant "tiled" (the paper's second kernel): 16 x 16 thread blocks stage a 16 x 16 tile of the
// input, and the tile's 16 scales, through shared memory, synchronize, then each thread converts
// its element from shared memory and writes it out. An element-wise op reuses nothing, so the
// staging costs a barrier and buys nothing: the paper's point (claim "tiling_no_gain") is that this
// variant should not beat naive, and it is kept faithful so that the ranking can be checked.
//
// Made correct for every shape: edge threads load nothing and store nothing but still reach every
// barrier; the y axis loops over tile rows with a grid stride (gridDim.y <= 65535), the loop bound
// being uniform across the block so the barriers are never divergent.
#include "kvpack/cuda_utils.cuh"

namespace kvpack {
namespace cuda {
namespace {

constexpr int kTile = 16;

template <typename Op, bool kPerToken>
__global__ void __launch_bounds__(kTile* kTile)
    elementwise_tiled_kernel(const typename Op::In* __restrict__ in,
                             const float* __restrict__ scales, typename Op::Out* __restrict__ out,
                             int64_t rows, int64_t cols) {
  using In = typename Op::In;
  // +1 column of padding: 4-byte elements of one tile column would otherwise share a bank.
  __shared__ In tile[kTile][kTile + 1];
  __shared__ float tile_scales[kTile];
  const Op op;
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  // 64-bit: col and row * cols can exceed 2^31 on large matrices.
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTile + tx;
  const bool col_ok = col < cols;

  if (!kPerToken) {  // a column's scale is the same for every tile of the column: stage it once
    if (ty == 0) tile_scales[tx] = col_ok ? scales[col] : 0.0f;
  }
  for (int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTile; row0 < rows;
       row0 += static_cast<int64_t>(gridDim.y) * kTile) {
    const int64_t row = row0 + ty;
    const bool ok = col_ok && row < rows;
    const int64_t i = row * cols + col;
    if (ok) tile[ty][tx] = in[i];
    if (kPerToken && tx == 0) tile_scales[ty] = row < rows ? scales[row] : 0.0f;
    __syncthreads();
    if (ok) out[i] = op(tile[ty][tx], tile_scales[kPerToken ? ty : tx]);
    __syncthreads();  // the tile is overwritten by the next iteration
  }
}

template <typename Op, bool kPerToken>
void launch_tiled(const ElementwiseArgs& a) {
  const dim3 block(kTile, kTile);
  const dim3 grid(static_cast<unsigned int>(ceil_div(a.cols, kTile)), grid_y(ceil_div(a.rows, kTile)));
  elementwise_tiled_kernel<Op, kPerToken><<<grid, block, 0, a.stream>>>(
      static_cast<const typename Op::In*>(a.in), a.scales, static_cast<typename Op::Out*>(a.out),
      a.rows, a.cols);
  KVPACK_LAUNCH_CHECK();
}

}  // namespace

void quantize_tiled(const ElementwiseArgs& a) {
  dispatch_elementwise<QuantizeOp>(a, "quantize_tiled", [&](auto op, auto per_token) {
    launch_tiled<typename decltype(op)::type, decltype(per_token)::value>(a);
  });
}

void dequantize_tiled(const ElementwiseArgs& a) {
  dispatch_elementwise<DequantizeOp>(a, "dequantize_tiled", [&](auto op, auto per_token) {
    launch_tiled<typename decltype(op)::type, decltype(per_token)::value>(a);
  });
}

}  // namespace cuda
}  // namespace kvpack
