#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <lorafuse/nn/linear4bit.h>
#include <lorafuse/ops/lora_linear.h>
#include <lorafuse/ops/nf.h>
#include <lorafuse/ops/nf4.h>
#include <torch/csrc/autograd/grad_mode.h>

namespace lorafuse::nn {
namespace {

void check_compute_dtype(c10::ScalarType dtype) {
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "Linear4bit: compute_dtype: expected float32, bfloat16 or float16, found ", dtype);
}

}  // namespace

Linear4bitImpl::Linear4bitImpl(const Linear4bitOptions& options_) : options(options_) {
  check_compute_dtype(options.compute_dtype());
  TORCH_CHECK_VALUE(options.in_features() > 0 && options.out_features() > 0,
                    "Linear4bit: in_features and out_features must be > 0, found ", options.in_features(), " and ",
                    options.out_features());
  reset();
}

void Linear4bitImpl::reset() {
  // A zero weight without quantizing a dense one: every statistic 0 (for NF4 every code 7, the value 0, as
  // bitsandbytes writes a zero weight). The meta quantize checks the format and gives the buffers' shapes and dtypes.
  const auto meta = at::empty({options.out_features(), options.in_features()}, at::TensorOptions().device(at::kMeta));
  const auto shapes = options.is_nf4() ? lorafuse::quantize_nf4(meta, options.blocksize(), options.double_quant())
                                       : lorafuse::quantize_nf(meta, options.format(), options.stat_dtype());
  const auto cpu = [](const at::Tensor& meta) { return at::zeros(meta.sizes(), meta.options().device(at::kCPU)); };
  packed = register_buffer("packed", options.bits() == 4 ? cpu(shapes.packed).fill_(0x77) : cpu(shapes.packed));
  absmax = register_buffer("absmax", cpu(shapes.absmax));
  nested_absmax = register_buffer("nested_absmax", cpu(shapes.nested_absmax));
  offset = register_buffer("offset", cpu(shapes.offset));
  bias = options.bias()
             ? register_parameter(
                   "bias", at::zeros({options.out_features()}, at::TensorOptions().dtype(options.compute_dtype())),
                   /*requires_grad=*/false)
             : at::Tensor();
}

std::shared_ptr<Linear4bitImpl> Linear4bitImpl::from_linear(const torch::nn::Linear& linear,
                                                            std::optional<c10::ScalarType> compute_dtype,
                                                            int64_t blocksize, bool double_quant) {
  TORCH_CHECK_VALUE(!linear.is_empty(), "linear: expected a torch::nn::Linear, found an empty holder");
  return from_weight(linear->weight, linear->bias, compute_dtype, blocksize, double_quant);
}

std::shared_ptr<Linear4bitImpl> Linear4bitImpl::from_weight(const at::Tensor& weight, const at::Tensor& bias,
                                                            std::optional<c10::ScalarType> compute_dtype,
                                                            int64_t blocksize, bool double_quant) {
  TORCH_CHECK_VALUE(weight.defined() && weight.dim() == 2,
                    "Linear4bit: weight: expected [out_features, in_features], found ",
                    weight.defined() ? weight.sizes() : at::IntArrayRef{});
  return from_weight(weight, bias,
                     Linear4bitOptions(weight.size(1), weight.size(0))
                         .bias(bias.defined())
                         .compute_dtype(compute_dtype.value_or(weight.scalar_type()))
                         .blocksize(blocksize)
                         .double_quant(double_quant));
}

std::shared_ptr<Linear4bitImpl> Linear4bitImpl::from_weight(const at::Tensor& weight_in, const at::Tensor& bias,
                                                            const Linear4bitOptions& options) {
  TORCH_CHECK_VALUE(weight_in.defined() && weight_in.dim() == 2 && weight_in.size(0) == options.out_features() &&
                        weight_in.size(1) == options.in_features(),
                    "Linear4bit: weight: expected [out_features, in_features] = [", options.out_features(), ", ",
                    options.in_features(), "], found ", weight_in.defined() ? weight_in.sizes() : at::IntArrayRef{});
  const at::Tensor weight = weight_in.detach();
  // on the weight's device; through the CPU in a build without CUDA kernels (the same bytes either way)
  const bool on_cpu = weight.is_cuda() && !lorafuse::has_cuda_kernels();
  const at::Tensor source = on_cpu ? weight.to(at::kCPU) : weight;
  const auto q = options.is_nf4() ? lorafuse::quantize_nf4(source, options.blocksize(), options.double_quant())
                                  : lorafuse::quantize_nf(source, options.format(), options.stat_dtype());
  auto layer = from_nf4(options,
                        {q.packed.to(weight.device()), q.absmax.to(weight.device()),
                         q.nested_absmax.to(weight.device()), q.offset.to(weight.device())},
                        bias);
  if (bias.defined()) layer->bias.set_requires_grad(bias.requires_grad());
  return layer;
}

namespace {

// A new layer's buffer or parameter takes `value` as it is (its storage and device): set_data, or for a meta value
// (a skeleton quantized on the meta device) what set_data does without its check that refuses a meta value for a
// CPU tensor.
void take(at::Tensor& target, const at::Tensor& value) {
  if (target.is_meta() == value.is_meta()) {
    target.set_data(value);
  } else {
    target.unsafeGetTensorImpl()->shallow_copy_from(value.getIntrusivePtr());
  }
}

}  // namespace

std::shared_ptr<Linear4bitImpl> Linear4bitImpl::from_nf4(const Linear4bitOptions& options, const Nf4Weight& weight,
                                                         const at::Tensor& bias) {
  auto layer = std::make_shared<Linear4bitImpl>(options);
  const auto expect = [](const char* name, const at::Tensor& want, const at::Tensor& got) {
    TORCH_CHECK_VALUE(got.defined() && got.sizes() == want.sizes() && got.scalar_type() == want.scalar_type(),
                      "Linear4bit: ", name, ": expected ", want.scalar_type(), " ", want.sizes(),
                      " for the options, found ", got.defined() ? got.scalar_type() : at::ScalarType::Undefined, " ",
                      got.defined() ? got.sizes() : at::IntArrayRef{});
  };
  expect("packed", layer->packed, weight.packed);
  expect("absmax", layer->absmax, weight.absmax);
  expect("nested_absmax", layer->nested_absmax, weight.nested_absmax);
  expect("offset", layer->offset, weight.offset);
  TORCH_CHECK_VALUE(bias.defined() == options.bias(), "Linear4bit: bias: ", options.bias() ? "expected" : "no",
                    " bias for options.bias() = ", options.bias(), ", found ", bias.defined() ? "one" : "none");
  torch::NoGradGuard no_grad;
  take(layer->packed, weight.packed.detach());
  take(layer->absmax, weight.absmax.detach());
  take(layer->nested_absmax, weight.nested_absmax.detach());
  take(layer->offset, weight.offset.detach());
  if (bias.defined()) {
    TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == options.out_features(), "Linear4bit: bias: expected [",
                      options.out_features(), "], found ", bias.sizes());
    take(layer->bias, bias.detach().to(options.compute_dtype()).clone());
  }
  return layer;
}

at::Tensor Linear4bitImpl::forward(const at::Tensor& x) {
  return lorafuse::linear_nf(x, packed, absmax, nested_absmax, offset, options.format(), options.out_features(),
                             bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt, options.compute_dtype());
}

at::Tensor Linear4bitImpl::dequantized_weight(std::optional<c10::ScalarType> dtype) const {
  return lorafuse::dequantize_nf(packed, absmax, nested_absmax, offset, options.format(),
                                 {options.out_features(), options.in_features()},
                                 dtype.value_or(options.compute_dtype()));
}

void Linear4bitImpl::pretty_print(std::ostream& stream) const {
  stream << "lorafuse::nn::Linear4bit(in_features=" << options.in_features()
         << ", out_features=" << options.out_features() << ", bias=" << (bias.defined() ? "true" : "false")
         << (options.is_nf4() ? ", nf4" : ", nf" + std::to_string(options.bits()))
         << ", blocksize=" << options.blocksize() << ", double_quant=" << (options.double_quant() ? "true" : "false");
  if (!options.is_nf4() && options.double_quant()) {
    stream << ", stat_bits=" << options.stat_bits() << ", stat_blocksize=" << options.stat_blocksize()
           << ", stat_dtype=" << options.stat_dtype();
  }
  stream << ", compute_dtype=" << options.compute_dtype() << ")";
}

Linear4bitOptions linear4bit_options(const QuantConfig& config, int64_t in_features, int64_t out_features, bool bias,
                                     c10::ScalarType compute_dtype) {
  return Linear4bitOptions(in_features, out_features)
      .bias(bias)
      .compute_dtype(compute_dtype)
      .blocksize(config.blocksize())
      .double_quant(config.double_quant())
      .bits(config.bits());
}

}  // namespace lorafuse::nn
