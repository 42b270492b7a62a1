// C++ API of the DoRA ops → dispatcher.
#include <ATen/core/dispatch/Dispatcher.h>
#include <lorafuse/ops/dora.h>

namespace lorafuse {

at::Tensor dora_weight_norm(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                            double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::dora_weight_norm", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(weight, lora_a, lora_b, scale);
}

at::Tensor dora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p,
                       const at::Tensor& magnitude, const std::optional<at::Tensor>& base_out) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lorafuse::dora_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                            const at::Tensor&, double, double, const at::Tensor&, const std::optional<at::Tensor>&)>();
  return op.call(x, weight, bias, lora_a, lora_b, scale, dropout_p, magnitude, base_out);
}

}  // namespace lorafuse
