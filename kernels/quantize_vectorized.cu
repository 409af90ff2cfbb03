// Variant "vectorized" (the paper's fourth kernel, its fastest): the kernel of
// kvpack/vectorized_kernel.cuh with plain (read-only path) loads, as the paper's.
#include "kvpack/vectorized_kernel.cuh"

namespace kvpack {
namespace cuda {

void quantize_vectorized(const ElementwiseArgs& a) {
  dispatch_elementwise<QuantizeOp>(a, "quantize_vectorized", [&](auto op, auto per_token) {
    launch_vectorized<typename decltype(op)::type, decltype(per_token)::value>(a);
  });
}

void dequantize_vectorized(const ElementwiseArgs& a) {
  dispatch_elementwise<DequantizeOp>(a, "dequantize_vectorized", [&](auto op, auto per_token) {
    launch_vectorized<typename decltype(op)::type, decltype(per_token)::value>(a);
  });
}

}  // namespace cuda
}  // namespace kvpack
