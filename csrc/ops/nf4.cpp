// C++ API of the NF4 ops → dispatcher; the code tables.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <lorafuse/ops/nf4.h>

#include <algorithm>

#include "csrc/ops/common/nf_checks.h"
#include "cuda/shared/nf4.h"

namespace lorafuse {

Nf4Weight quantize_nf4(const at::Tensor& weight, int64_t blocksize, bool double_quant) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lorafuse::quantize_nf4", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t, bool)>();
  auto [packed, absmax, nested_absmax, offset] = op.call(weight, blocksize, double_quant);
  return {packed, absmax, nested_absmax, offset};
}

at::Tensor dequantize_nf4(const at::Tensor& packed, const at::Tensor& absmax,
                          const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                          int64_t blocksize, at::IntArrayRef shape, at::ScalarType dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::dequantize_nf4", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, int64_t, at::IntArrayRef, at::ScalarType)>();
  return op.call(packed, absmax, nested_absmax, offset, blocksize, shape, dtype);
}

Nf4Merge nf4_merge(const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                   const std::optional<at::Tensor>& offset, int64_t blocksize, at::IntArrayRef shape,
                   at::TensorList lora_a, at::TensorList lora_b, c10::ArrayRef<double> scale) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lorafuse::nf4_merge", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              int64_t, at::IntArrayRef, at::TensorList, at::TensorList, c10::ArrayRef<double>)>();
  auto [p, a, n, o, error] = op.call(packed, absmax, nested_absmax, offset, blocksize, shape, lora_a, lora_b, scale);
  const at::Tensor e = error.to(at::kCPU, at::kDouble);
  return {{p, a, n, o}, e[0].item<double>(), e[1].item<double>(), error};
}

at::Tensor nf4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                      const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                      int64_t blocksize, int64_t out_features, const std::optional<at::Tensor>& bias) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lorafuse::nf4_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, int64_t, int64_t, const std::optional<at::Tensor>&)>();
  return op.call(x, packed, absmax, nested_absmax, offset, blocksize, out_features, bias);
}

at::Tensor nf4_linear_backward(const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                               int64_t blocksize, int64_t in_features) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lorafuse::nf4_linear_backward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, int64_t, int64_t)>();
  return op.call(grad_out, packed, absmax, nested_absmax, offset, blocksize, in_features);
}

at::Tensor linear4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                      const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                      int64_t blocksize, int64_t out_features, const std::optional<at::Tensor>& bias,
                      at::ScalarType compute_dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::linear4bit", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t,
                                         int64_t, const std::optional<at::Tensor>&, at::ScalarType)>();
  return op.call(x, packed, absmax, nested_absmax, offset, blocksize, out_features, bias, compute_dtype);
}

at::Tensor nf4_lora_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                           int64_t blocksize, int64_t out_features, const std::optional<at::Tensor>& bias,
                           const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lorafuse::nf4_lora_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, int64_t, int64_t, const std::optional<at::Tensor>&,
                            const at::Tensor&, const at::Tensor&, double, double)>();
  return op.call(x, packed, absmax, nested_absmax, offset, blocksize, out_features, bias, lora_a, lora_b, scale,
                 dropout_p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nf4_lora_linear_forward(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset, int64_t blocksize,
    int64_t out_features, const std::optional<at::Tensor>& bias, const at::Tensor& lora_a, const at::Tensor& lora_b,
    double scale, double dropout_p) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::nf4_lora_linear_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, int64_t, int64_t, const std::optional<at::Tensor>&,
                           const at::Tensor&, const at::Tensor&, double, double)>();
  return op.call(x, packed, absmax, nested_absmax, offset, blocksize, out_features, bias, lora_a, lora_b, scale,
                 dropout_p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nf4_lora_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset, int64_t blocksize,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& rng_state, double scale,
    double dropout_p, std::array<bool, 4> output_mask) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lorafuse::nf4_lora_linear_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, std::array<bool, 4>)>();
  return op.call(grad_out, x, packed, absmax, nested_absmax, offset, blocksize, lora_a, lora_b, u, rng_state, scale,
                 dropout_p, output_mask);
}

at::Tensor lora_linear4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                           int64_t blocksize, int64_t out_features, const std::optional<at::Tensor>& bias,
                           at::ScalarType compute_dtype, const at::Tensor& lora_a, const at::Tensor& lora_b,
                           double scale, double dropout_p) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lorafuse::lora_linear4bit", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, int64_t, int64_t, const std::optional<at::Tensor>&,
                            at::ScalarType, const at::Tensor&, const at::Tensor&, double, double)>();
  return op.call(x, packed, absmax, nested_absmax, offset, blocksize, out_features, bias, compute_dtype, lora_a, lora_b,
                 scale, dropout_p);
}

at::Tensor nf4_code_map() {
  at::Tensor out = at::empty({16}, at::TensorOptions().dtype(at::kFloat));
  std::copy(std::begin(nf4::kCode), std::end(nf4::kCode), out.data_ptr<float>());
  return out;
}

at::Tensor dynamic_code_map() {
  at::Tensor out = at::empty({256}, at::TensorOptions().dtype(at::kFloat));
  const auto& code = detail::dynamic_code();
  std::copy(code.begin(), code.end(), out.data_ptr<float>());
  return out;
}

}  // namespace lorafuse
