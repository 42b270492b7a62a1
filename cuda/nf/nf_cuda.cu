// Host wrappers of the quantized-weight CUDA kernels (cuda/nf/nf_kernel.cuh) and their TORCH_LIBRARY_IMPL(lorafuse,
// CUDA, m) for every format of the family (NF-b, b = 2 .. 8; statistics in float32 or quantized again with float32,
// bfloat16 or float16 scales): quantize_nf and dequantize_nf (bit-exact with the CPU kernels: the same bytes on every
// device, bitsandbytes' for NF4), nf_linear (T ≤ kGemvTokens: the GEMV on the packed codes; larger T: the weight
// dequantized into a scratch buffer in x's dtype, then cuBLAS) and nf_linear_backward (dX = dY·W through cuBLAS on the
// dequantized weight). The LoRA ops over a quantized base (nf_lora_linear, lora_linear_nf) and nf_merge are composites
// of these on CUDA.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/max.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "csrc/ops/common/nf_checks.h"
#include "cuda/common/launch.h"
#include "cuda/nf/nf_launch.cuh"

namespace lorafuse::cuda {
namespace {

// The device view of the weight (tensors made contiguous, 16-bit scales widened to float32, all kept alive here).
struct Weight {
  at::Tensor packed, absmax, nested, offset;
  NfView view;
};

Weight weight_of(const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                 const std::optional<at::Tensor>& offset, const nf::Format& f, bool nested) {
  Weight w;
  w.packed = packed.contiguous();
  w.absmax = absmax.contiguous();
  if (nested) {
    w.nested = nested_absmax->to(at::kFloat).contiguous();
    w.offset = offset->to(at::kFloat).contiguous();
  }
  w.view = nf_view(f, w.packed.data_ptr<uint8_t>(), nested ? nullptr : w.absmax.data_ptr<float>(),
                   nested ? w.absmax.data_ptr<uint8_t>() : nullptr, nested ? w.nested.data_ptr<float>() : nullptr,
                   nested ? w.offset.data_ptr<float>() : nullptr, lorafuse::detail::weight_code(f.bits).data(),
                   nested ? lorafuse::detail::statistics_code(f.stat_bits).data() : nullptr);
  return w;
}

int64_t max_blocks(const at::Tensor& t) {
  return 8 * static_cast<int64_t>(at::cuda::getDeviceProperties(t.device().index())->multiProcessorCount);
}

// The weight [out, in] in `dtype`, decoded by the dequantize kernel (the scratch buffer of the large-T paths).
at::Tensor dequantized(const Weight& w, int64_t out_features, int64_t in_features, at::ScalarType dtype,
                       const at::Tensor& like) {
  at::Tensor dense = at::empty({out_features, in_features}, like.options().dtype(dtype));
  const CudaLauncher launch{at::cuda::getCurrentCUDAStream()};
  dispatch_float_types(dtype, "lorafuse.dequantize_nf", [&](auto tag) {
    using T = typename decltype(tag)::type;
    run_nf_dequantize<T>(launch, w.view, device_ptr<T>(dense), dense.numel(), max_blocks(like));
  });
  return dense;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_nf_cuda(const at::Tensor& weight,
                                                                            at::IntArrayRef format,
                                                                            at::ScalarType stat_dtype) {
  constexpr const char* op = "lorafuse.quantize_nf";
  const nf::Format f = lorafuse::detail::parse_nf_format(op, format);
  lorafuse::detail::check_quantize_nf_args(op, weight, f, stat_dtype);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor flat = weight.reshape(-1).to(at::kFloat).contiguous();  // row-major, as bitsandbytes reads it
  lorafuse::detail::check_nf_finite(op, flat);
  const int64_t n = flat.numel();
  const auto f32 = flat.options();
  at::Tensor packed = at::empty({nf::stream_bytes(n, f.bits), 1}, f32.dtype(at::kByte));
  at::Tensor absmax = at::empty({nf::blocks_of(n, f.blocksize)}, f32);
  const CudaLauncher launch{at::cuda::getCurrentCUDAStream()};
  run_nf_quantize(launch, nf_quantize_params(f, lorafuse::detail::weight_code(f.bits).data(), flat.data_ptr<float>(), n,
                                             absmax.data_ptr<float>(), packed.data_ptr<uint8_t>()));
  if (!f.nested()) return {packed, absmax, at::empty({0}, f32), at::empty({0}, f32)};
  const at::Tensor offset = lorafuse::detail::statistics_offset(f, absmax.cpu()).to(weight.device());
  at::Tensor device_lut;
  if (f.dynamic_statistics()) {
    const auto& lut = lorafuse::detail::dynamic_lut();
    device_lut = at::from_blob(const_cast<uint8_t*>(lut.data()), {nf4::kLutSize}, at::TensorOptions().dtype(at::kByte))
                     .to(weight.device());
  }
  const int64_t blocks = absmax.numel();
  at::Tensor codes = at::empty({nf::stream_bytes(blocks, f.stat_bits)}, f32.dtype(at::kByte));
  at::Tensor scales = at::empty({nf::blocks_of(blocks, f.stat_blocksize)}, f32);
  const int scale_dtype = stat_dtype == at::kHalf ? 1 : (stat_dtype == at::kBFloat16 ? 2 : 0);
  run_nf_quantize_statistics(
      launch, nf_quantize_statistics_params(f, lorafuse::detail::statistics_code(f.stat_bits).data(),
                                            f.dynamic_statistics() ? device_lut.data_ptr<uint8_t>() : nullptr,
                                            absmax.data_ptr<float>(), offset.data_ptr<float>(), blocks, scale_dtype,
                                            scales.data_ptr<float>(), codes.data_ptr<uint8_t>()));
  if (stat_dtype != at::kFloat) {
    const at::Tensor largest = scales.abs().max().cpu();
    TORCH_CHECK_VALUE(std::isfinite(largest.item<float>()), op, ": stat_dtype: a block of statistics has scale ",
                      largest.item<float>(), " in ", stat_dtype, ", which cannot hold it; use float32 scales");
  }
  return {packed, codes, scales.to(stat_dtype), offset};
}

at::Tensor dequantize_nf_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                              const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                              at::IntArrayRef format, at::IntArrayRef shape, at::ScalarType dtype) {
  constexpr const char* op = "lorafuse.dequantize_nf";
  const nf::Format f = lorafuse::detail::parse_nf_format(op, format);
  const bool nested =
      lorafuse::detail::check_dequantize_nf_args(op, packed, absmax, nested_absmax, offset, f, shape, dtype);
  const c10::cuda::CUDAGuard guard(packed.device());
  int64_t n = 1;
  for (const auto d : shape) n *= d;
  const Weight w = weight_of(packed, absmax, nested_absmax, offset, f, nested);
  at::Tensor out = at::empty({n}, packed.options().dtype(dtype));
  const CudaLauncher launch{at::cuda::getCurrentCUDAStream()};
  dispatch_float_types(dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    run_nf_dequantize<T>(launch, w.view, device_ptr<T>(out), n, max_blocks(packed));
  });
  return out.reshape(shape);
}

at::Tensor nf_linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                          at::IntArrayRef format, int64_t out_features, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "lorafuse.nf_linear";
  const nf::Format f = lorafuse::detail::parse_nf_format(op, format);
  const int64_t in_features = x.dim() >= 1 ? x.size(-1) : 0;
  const bool nested = lorafuse::detail::check_nf_linear_args(op, x, in_features, packed, absmax, nested_absmax, offset,
                                                             f, out_features, in_features, bias);
  check_cuda_dtype(x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const Weight w = weight_of(packed, absmax, nested_absmax, offset, f, nested);
  at::Tensor x2 = x.reshape({-1, in_features});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  const int64_t tokens = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(out_features);
  const bool has_bias = bias.has_value() && bias->defined();
  if (tokens <= kGemvTokens) {  // decode: the packed bytes are read once, never a dense weight
    at::Tensor y = at::empty({tokens, out_features}, x.options());
    const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
    const CudaLauncher launch{at::cuda::getCurrentCUDAStream()};
    dispatch_float_types(x.scalar_type(), op, [&](auto tag) {
      using T = typename decltype(tag)::type;
      run_nf_gemv<T>(launch, NfGemvParams<T>{w.view, device_ptr<T>(x2), has_bias ? device_ptr<T>(b) : nullptr,
                                             device_ptr<T>(y), tokens, in_features, out_features, x2.stride(0)});
    });
    return y.view(out_shape);
  }
  const at::Tensor dense = dequantized(w, out_features, in_features, x.scalar_type(), x);
  const at::Tensor y = has_bias ? at::addmm(*bias, x2, dense.t()) : at::mm(x2, dense.t());
  return y.view(out_shape);
}

at::Tensor nf_linear_backward_cuda(const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& absmax,
                                   const std::optional<at::Tensor>& nested_absmax,
                                   const std::optional<at::Tensor>& offset, at::IntArrayRef format,
                                   int64_t in_features) {
  constexpr const char* op = "lorafuse.nf_linear_backward";
  const nf::Format f = lorafuse::detail::parse_nf_format(op, format);
  const int64_t out_features = grad_out.dim() >= 1 ? grad_out.size(-1) : 0;
  const bool nested = lorafuse::detail::check_nf_linear_args(op, grad_out, out_features, packed, absmax, nested_absmax,
                                                             offset, f, out_features, in_features, std::nullopt);
  check_cuda_dtype(grad_out, op);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const Weight w = weight_of(packed, absmax, nested_absmax, offset, f, nested);
  const at::Tensor dy = grad_out.reshape({-1, out_features});
  const at::Tensor dense = dequantized(w, out_features, in_features, grad_out.scalar_type(), grad_out);
  std::vector<int64_t> shape(grad_out.sizes().begin(), grad_out.sizes().end() - 1);
  shape.push_back(in_features);
  return at::mm(dy, dense).view(shape);  // cuBLAS accumulates 16-bit products in float32
}

}  // namespace
}  // namespace lorafuse::cuda

TORCH_LIBRARY_IMPL(lorafuse, CUDA, m) {
  m.impl("quantize_nf", &lorafuse::cuda::quantize_nf_cuda);
  m.impl("dequantize_nf", &lorafuse::cuda::dequantize_nf_cuda);
  m.impl("nf_linear", &lorafuse::cuda::nf_linear_cuda);
  m.impl("nf_linear_backward", &lorafuse::cuda::nf_linear_backward_cuda);
}
