// C++ API of lora_adapted_weight → dispatcher.
#include <ATen/core/dispatch/Dispatcher.h>
#include <lorafuse/ops/adapted_weight.h>

namespace lorafuse {

at::Tensor lora_adapted_weight(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                               double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::lora_adapted_weight", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(weight, lora_a, lora_b, scale);
}

}  // namespace lorafuse
