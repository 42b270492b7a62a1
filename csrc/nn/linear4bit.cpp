#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <lorafuse/nn/linear4bit.h>
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
  // A zero weight in NF4 without quantizing a dense one: every code is 7 (the value 0), every statistic 0. The
  // meta quantize_nf4 checks the blocksize and gives the buffers' shapes and dtypes.
  const auto shapes = lorafuse::quantize_nf4(
      at::empty({options.out_features(), options.in_features()}, at::TensorOptions().device(at::kMeta)),
      options.blocksize(), options.double_quant());
  const auto cpu = [](const at::Tensor& meta) { return at::zeros(meta.sizes(), meta.options().device(at::kCPU)); };
  packed = register_buffer("packed", cpu(shapes.packed).fill_(0x77));
  absmax = register_buffer("absmax", cpu(shapes.absmax));
  nested_absmax = register_buffer("nested_absmax", cpu(shapes.nested_absmax));
  offset = register_buffer("offset", cpu(shapes.offset));
  bias = options.bias() ? register_parameter(
                              "bias", at::zeros({options.out_features()}, at::TensorOptions().dtype(options.compute_dtype())),
                              /*requires_grad=*/false)
                        : at::Tensor();
}

std::shared_ptr<Linear4bitImpl> Linear4bitImpl::from_linear(const torch::nn::Linear& linear,
                                                            std::optional<c10::ScalarType> compute_dtype,
                                                            int64_t blocksize, bool double_quant) {
  TORCH_CHECK_VALUE(!linear.is_empty(), "linear: expected a torch::nn::Linear, found an empty holder");
  const at::Tensor weight = linear->weight.detach();
  auto layer = std::make_shared<Linear4bitImpl>(Linear4bitOptions(linear->options.in_features(),
                                                                  linear->options.out_features())
                                                    .bias(linear->options.bias())
                                                    .compute_dtype(compute_dtype.value_or(weight.scalar_type()))
                                                    .blocksize(blocksize)
                                                    .double_quant(double_quant));
  const auto q = lorafuse::quantize_nf4(weight.to(at::kCPU), blocksize, double_quant);
  torch::NoGradGuard no_grad;
  layer->packed.set_data(q.packed.to(weight.device()));
  layer->absmax.set_data(q.absmax.to(weight.device()));
  layer->nested_absmax.set_data(q.nested_absmax.to(weight.device()));
  layer->offset.set_data(q.offset.to(weight.device()));
  if (linear->bias.defined()) {
    layer->bias.set_data(linear->bias.detach().to(layer->options.compute_dtype()).clone());
    layer->bias.set_requires_grad(linear->bias.requires_grad());
  }
  return layer;
}

at::Tensor Linear4bitImpl::forward(const at::Tensor& x) {
  return lorafuse::linear4bit(x, packed, absmax, nested_absmax, offset, options.blocksize(), options.out_features(),
                              bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt, options.compute_dtype());
}

at::Tensor Linear4bitImpl::dequantized_weight(std::optional<c10::ScalarType> dtype) const {
  return lorafuse::dequantize_nf4(packed, absmax, nested_absmax, offset, options.blocksize(),
                                  {options.out_features(), options.in_features()},
                                  dtype.value_or(options.compute_dtype()));
}

void Linear4bitImpl::pretty_print(std::ostream& stream) const {
  stream << "lorafuse::nn::Linear4bit(in_features=" << options.in_features()
         << ", out_features=" << options.out_features() << ", bias=" << (bias.defined() ? "true" : "false")
         << ", nf4, blocksize=" << options.blocksize() << ", double_quant=" << (options.double_quant() ? "true" : "false")
         << ", compute_dtype=" << options.compute_dtype() << ")";
}

}  // namespace lorafuse::nn
