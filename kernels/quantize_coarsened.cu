// Variant "coarsened" (the paper's third kernel): thread coarsening by 4 along the columns. A
// 16 x 16 thread block covers a 16-row x 64-column tile; each thread handles 4 columns of its row,
// col, col + 16, col + 32 and col + 48, so that at each of its 4 steps the 16 threads of a row
// still touch 16 neighbouring elements (coalesced), and the per-thread index arithmetic and the
// loop overhead are paid once for 4 elements.
//
// Made correct for every shape: each of the 4 columns is bounds-checked (D need not be a multiple
// of 64), and the y axis loops over rows with a grid stride (gridDim.y <= 65535).
#include "kvpack/cuda_utils.cuh"

namespace kvpack {
namespace cuda {
namespace {

constexpr int kBlock = 16;   // the paper's 16 x 16 block
constexpr int kCoarsen = 4;  // the paper's coarsening factor

template <typename Op, bool kPerToken>
__global__ void __launch_bounds__(kBlock* kBlock)
    elementwise_coarsened_kernel(const typename Op::In* __restrict__ in,
                                 const float* __restrict__ scales,
                                 typename Op::Out* __restrict__ out, int64_t rows, int64_t cols) {
  const Op op;
  // 64-bit: col and row * cols can exceed 2^31 on large matrices.
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * (kBlock * kCoarsen) + threadIdx.x;
  if (col0 >= cols) return;
  float col_scale[kCoarsen];  // per channel: the 4 columns' scales, read once for all rows
  if (!kPerToken) {
#pragma unroll
    for (int k = 0; k < kCoarsen; ++k) {
      const int64_t col = col0 + k * kBlock;
      col_scale[k] = col < cols ? scales[col] : 0.0f;
    }
  }
  const int64_t row_stride = static_cast<int64_t>(gridDim.y) * kBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * kBlock + threadIdx.y; row < rows;
       row += row_stride) {
    const float row_scale = kPerToken ? scales[row] : 0.0f;
    const int64_t base = row * cols;
#pragma unroll
    for (int k = 0; k < kCoarsen; ++k) {
      const int64_t col = col0 + k * kBlock;
      if (col < cols) out[base + col] = op(in[base + col], kPerToken ? row_scale : col_scale[k]);
    }
  }
}

template <typename Op, bool kPerToken>
void launch_coarsened(const ElementwiseArgs& a) {
  const dim3 block(kBlock, kBlock);
  const dim3 grid(static_cast<unsigned int>(ceil_div(a.cols, kBlock * kCoarsen)),
                  grid_y(ceil_div(a.rows, kBlock)));
  elementwise_coarsened_kernel<Op, kPerToken><<<grid, block, 0, a.stream>>>(
      static_cast<const typename Op::In*>(a.in), a.scales, static_cast<typename Op::Out*>(a.out),
      a.rows, a.cols);
  KVPACK_LAUNCH_CHECK();
}

}  // namespace

void quantize_coarsened(const ElementwiseArgs& a) {
  dispatch_elementwise<QuantizeOp>(a, "quantize_coarsened", [&](auto op, auto per_token) {
    launch_coarsened<typename decltype(op)::type, decltype(per_token)::value>(a);
  });
}

void dequantize_coarsened(const ElementwiseArgs& a) {
  dispatch_elementwise<DequantizeOp>(a, "dequantize_coarsened", [&](auto op, auto per_token) {
    launch_coarsened<typename decltype(op)::type, decltype(per_token)::value>(a);
  });
}

}  // namespace cuda
}  // namespace kvpack
