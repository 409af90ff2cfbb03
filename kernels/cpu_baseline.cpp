// The paper's CPU baseline, reproduced faithfully: serial loops, column-outer / row-inner over
// row-major [T, D] data (each inner step jumps D elements), no threads, no SIMD intent. The abs-max
// step is quant_math.h's absmax_combine (std::max would drop a NaN), so NaN and inf reach the scale.
// Registered as the CPU implementation of the kvpack ops with variant "cpu_serial".
#include <algorithm>
#include <cmath>

#include <ATen/Dispatch.h>
#include <torch/library.h>
#include <torch/types.h>

#include "kvpack/checks.h"
#include "kvpack/quant_math.h"

namespace kvpack {
namespace {

template <typename scalar_t>
void scales_serial(const scalar_t* x, float* s, int64_t T, int64_t D, Granularity g) {
  if (g == Granularity::kChannel) {
    for (int64_t d = 0; d < D; ++d) {
      float m = 0.0f;
      for (int64_t t = 0; t < T; ++t) m = absmax_combine(m, static_cast<float>(x[t * D + d]));
      s[d] = scale_from_absmax(m);
    }
  } else {
    for (int64_t t = 0; t < T; ++t) {
      float m = 0.0f;
      for (int64_t d = 0; d < D; ++d) m = absmax_combine(m, static_cast<float>(x[t * D + d]));
      s[t] = scale_from_absmax(m);
    }
  }
}

template <typename scalar_t>
void quantize_serial(const scalar_t* x, const float* s, int8_t* q, int64_t T, int64_t D,
                     Granularity g) {
  if (g == Granularity::kChannel) {
    for (int64_t d = 0; d < D; ++d)
      for (int64_t t = 0; t < T; ++t)
        q[t * D + d] = quantize_value(static_cast<float>(x[t * D + d]), s[d]);
  } else {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t d = 0; d < D; ++d)
        q[t * D + d] = quantize_value(static_cast<float>(x[t * D + d]), s[t]);
  }
}

template <typename scalar_t>
void dequantize_serial(const int8_t* q, const float* s, scalar_t* y, int64_t T, int64_t D,
                       Granularity g) {
  if (g == Granularity::kChannel) {
    for (int64_t d = 0; d < D; ++d)
      for (int64_t t = 0; t < T; ++t)
        y[t * D + d] = static_cast<scalar_t>(dequantize_value(q[t * D + d], s[d]));
  } else {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t d = 0; d < D; ++d)
        y[t * D + d] = static_cast<scalar_t>(dequantize_value(q[t * D + d], s[t]));
  }
}

void check_cpu_variant(const std::string& variant) {
  TORCH_CHECK_VALUE(variant == "cpu_serial", "kvpack: variant '", variant,
                    "' has no CPU implementation in the extension (CPU: 'cpu_serial'; "
                    "'cpu_torch' runs in Python)");
}

at::Tensor compute_scales_cpu(const at::Tensor& x_in, c10::string_view granularity) {
  const auto g = parse_granularity(std::string(granularity));
  check_float_input(x_in);
  const auto x = x_in.contiguous();
  auto s = at::empty({num_scales(x, g)}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scales_serial", [&] {
    scales_serial(x.const_data_ptr<scalar_t>(), s.mutable_data_ptr<float>(), x.size(0), x.size(1), g);
  });
  return s;
}

at::Tensor quantize_cpu(const at::Tensor& x_in, const at::Tensor& s_in, c10::string_view variant,
                        c10::string_view granularity) {
  check_cpu_variant(std::string(variant));
  const auto g = parse_granularity(std::string(granularity));
  check_float_input(x_in);
  check_scales(x_in, s_in, g);
  const auto x = x_in.contiguous();
  const auto s = s_in.contiguous();
  auto q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_serial", [&] {
    quantize_serial(x.const_data_ptr<scalar_t>(), s.const_data_ptr<float>(),
                    q.mutable_data_ptr<int8_t>(), x.size(0), x.size(1), g);
  });
  return q;
}

at::Tensor dequantize_cpu(const at::Tensor& q_in, const at::Tensor& s_in, c10::string_view variant,
                          c10::string_view granularity, at::ScalarType dtype) {
  check_cpu_variant(std::string(variant));
  const auto g = parse_granularity(std::string(granularity));
  check_int8_input(q_in);
  check_scales(q_in, s_in, g);
  check_out_dtype(dtype);
  const auto q = q_in.contiguous();
  const auto s = s_in.contiguous();
  auto y = at::empty(q.sizes(), q.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequantize_serial", [&] {
    dequantize_serial(q.const_data_ptr<int8_t>(), s.const_data_ptr<float>(),
                      y.mutable_data_ptr<scalar_t>(), q.size(0), q.size(1), g);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> quantize_fused_cpu(const at::Tensor& x, c10::string_view variant,
                                                      c10::string_view granularity) {
  auto s = compute_scales_cpu(x, granularity);
  return {quantize_cpu(x, s, variant, granularity), s};
}

}  // namespace

TORCH_LIBRARY_IMPL(kvpack, CPU, m) {
  m.impl("compute_scales", &compute_scales_cpu);
  m.impl("quantize", &quantize_cpu);
  m.impl("dequantize", &dequantize_cpu);
  m.impl("quantize_fused", &quantize_fused_cpu);
}

}  // namespace kvpack
