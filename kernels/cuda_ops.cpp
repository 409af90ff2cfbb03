// CUDA implementations of the kvpack ops (schemas in ops.cpp): host checks, device guard, current
// stream, then the variant's launcher (launchers.h). The one TORCH_LIBRARY_IMPL(kvpack, CUDA).
//
// A .cpp file on purpose, compiled by the host compiler (g++) like ops.cpp and cpu_baseline.cpp,
// never by nvcc: every piece of code that touches at::Tensor, c10::str or a torch exception lives
// in g++-compiled files, and the .cu files hold only kernels and raw-pointer launchers. (When this
// file was cuda_ops.cu, a failing check_scales in it crashed the process instead of raising.)
// kvpack/build.py adds it to the build only together with the .cu files.
//
// Variants: naive, tiled, coarsened, vectorized (the paper's four) and fast (ours). compute_scales
// has one GPU implementation (scales.cu) shared by every variant.
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "kvpack/checks.h"
#include "kvpack/launchers.h"

namespace kvpack {
namespace {

struct CudaVariant {
  const char* name;
  cuda::ElementwiseLauncher quantize;
  cuda::ElementwiseLauncher dequantize;
};

constexpr CudaVariant kCudaVariants[] = {
    {"naive", &cuda::quantize_naive, &cuda::dequantize_naive},
    {"tiled", &cuda::quantize_tiled, &cuda::dequantize_tiled},
    {"coarsened", &cuda::quantize_coarsened, &cuda::dequantize_coarsened},
    {"vectorized", &cuda::quantize_vectorized, &cuda::dequantize_vectorized},
    {"fast", &cuda::quantize_fast, &cuda::dequantize_fast},
};

const CudaVariant& find_variant(c10::string_view variant) {
  for (const auto& v : kCudaVariants) {
    if (variant == v.name) return v;
  }
  TORCH_CHECK_VALUE(false, "kvpack: unknown CUDA variant '", std::string(variant),
                    "'; the CUDA variants are 'naive', 'tiled', 'coarsened', 'vectorized' and "
                    "'fast' ('cpu_serial' and 'cpu_torch' run on CPU tensors)");
}

void check_on_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), "kvpack: ", name, " is on ", t.device(),
                    "; the CUDA variants need CUDA tensors");
}

// D indexes grid x blocks of 16..64 columns; a head dimension past 2^31 is not a KV cache.
void check_cols(const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.size(1) <= std::numeric_limits<int32_t>::max(), "kvpack: D = ", t.size(1),
                    " columns is more than the CUDA kernels support (2^31 - 1)");
}

cudaStream_t current_stream() {
  // The same stream as at::cuda::getCurrentCUDAStream(): ATen re-exports c10's.
  return c10::cuda::getCurrentCUDAStream().stream();
}

at::Tensor compute_scales_cuda(const at::Tensor& x_in, c10::string_view granularity) {
  const auto g = parse_granularity(std::string(granularity));
  check_float_input(x_in);
  check_on_cuda(x_in, "x");
  check_cols(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  auto s = at::empty({num_scales(x, g)}, x.options().dtype(at::kFloat));
  cuda::compute_scales(x.const_data_ptr(), s.mutable_data_ptr<float>(), x.size(0), x.size(1),
                       x.scalar_type(), g == Granularity::kToken, current_stream());
  return s;
}

at::Tensor quantize_cuda(const at::Tensor& x_in, const at::Tensor& s_in, c10::string_view variant,
                         c10::string_view granularity) {
  const auto& v = find_variant(variant);
  const auto g = parse_granularity(std::string(granularity));
  check_float_input(x_in);
  check_scales(x_in, s_in, g);
  check_on_cuda(x_in, "x");
  check_cols(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto s = s_in.contiguous();
  auto q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  v.quantize({x.const_data_ptr(), s.const_data_ptr<float>(), q.mutable_data_ptr(), x.size(0),
              x.size(1), x.scalar_type(), g == Granularity::kToken, current_stream()});
  return q;
}

at::Tensor dequantize_cuda(const at::Tensor& q_in, const at::Tensor& s_in,
                           c10::string_view variant, c10::string_view granularity,
                           at::ScalarType dtype) {
  const auto& v = find_variant(variant);
  const auto g = parse_granularity(std::string(granularity));
  check_int8_input(q_in);
  check_scales(q_in, s_in, g);
  check_out_dtype(dtype);
  check_on_cuda(q_in, "q");
  check_cols(q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto q = q_in.contiguous();
  const auto s = s_in.contiguous();
  auto y = at::empty(q.sizes(), q.options().dtype(dtype));
  v.dequantize({q.const_data_ptr(), s.const_data_ptr<float>(), y.mutable_data_ptr(), q.size(0),
                q.size(1), dtype, g == Granularity::kToken, current_stream()});
  return y;
}

std::tuple<at::Tensor, at::Tensor> quantize_fused_cuda(const at::Tensor& x_in,
                                                       c10::string_view variant,
                                                       c10::string_view granularity) {
  const auto& v = find_variant(variant);
  const auto g = parse_granularity(std::string(granularity));
  check_float_input(x_in);
  check_on_cuda(x_in, "x");
  check_cols(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  auto s = at::empty({num_scales(x, g)}, x.options().dtype(at::kFloat));
  auto q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  cuda::quantize_fused({x.const_data_ptr(), nullptr, q.mutable_data_ptr(), x.size(0), x.size(1),
                        x.scalar_type(), g == Granularity::kToken, current_stream()},
                       s.mutable_data_ptr<float>(), v.quantize);
  return {q, s};
}

// The fast kernels' device-derived choices on probe's device, as JSON (kvpack.ops.fast_tuning).
std::string fast_tuning_cuda(const at::Tensor& probe) {
  check_on_cuda(probe, "probe");
  const c10::cuda::CUDAGuard guard(probe.device());
  const cuda::FastTuning t = cuda::fast_tuning();
  auto triple = [](const int* v) {
    return "{\"float32\": " + std::to_string(v[0]) + ", \"float16\": " + std::to_string(v[1]) +
           ", \"bfloat16\": " + std::to_string(v[2]) + "}";
  };
  return "{\"sm_count\": " + std::to_string(t.sm_count) + ", \"peak_gbps\": " + std::to_string(t.peak_gbps) +
         ", \"bytes_in_flight_per_sm\": " + std::to_string(t.bytes_in_flight_per_sm) +
         ", \"quantize_rows_in_flight\": " + triple(t.quantize_rows_in_flight) +
         ", \"quantize_blocks_per_sm\": " + triple(t.quantize_blocks_per_sm) + "}";
}

}  // namespace

TORCH_LIBRARY_IMPL(kvpack, CUDA, m) {
  m.impl("fast_tuning", &fast_tuning_cuda);
  m.impl("compute_scales", &compute_scales_cuda);
  m.impl("quantize", &quantize_cuda);
  m.impl("dequantize", &dequantize_cuda);
  m.impl("quantize_fused", &quantize_fused_cuda);
}

}  // namespace kvpack
