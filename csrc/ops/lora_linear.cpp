// C++ API → dispatcher. Callers never reach a backend kernel directly.
#include <ATen/core/dispatch/Dispatcher.h>
#include <lorafuse/ops/lora_linear.h>

namespace lorafuse {

at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::lora_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         const at::Tensor&, const at::Tensor&, double, double)>();
  return op.call(x, weight, bias, lora_a, lora_b, scale, dropout_p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_forward(const at::Tensor& x, const at::Tensor& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   const at::Tensor& lora_a,
                                                                   const at::Tensor& lora_b, double scale,
                                                                   double dropout_p) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::lora_linear_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                           const at::Tensor&, double, double)>();
  return op.call(x, weight, bias, lora_a, lora_b, scale, dropout_p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& rng_state, double scale,
    double dropout_p, std::array<bool, 4> output_mask) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lorafuse::lora_linear_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, double, double, std::array<bool, 4>)>();
  return op.call(grad_out, x, weight, lora_a, lora_b, u, rng_state, scale, dropout_p, output_mask);
}

bool has_cuda_kernels() { return LORAFUSE_WITH_CUDA; }

}  // namespace lorafuse
