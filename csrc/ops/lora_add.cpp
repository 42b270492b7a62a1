// C++ API of lora_add → dispatcher.
#include <ATen/core/dispatch/Dispatcher.h>
#include <lorafuse/ops/lora_add.h>

namespace lorafuse {

at::Tensor lora_add(const at::Tensor& base_out, const at::Tensor& x, const at::Tensor& lora_a,
                    const at::Tensor& lora_b, double scale, double dropout_p) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::lora_add", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         double, double)>();
  return op.call(base_out, x, lora_a, lora_b, scale, dropout_p);
}

at::Tensor lora_branch(const at::Tensor& base_out, const at::Tensor& x, const at::Tensor& lora_a,
                       const at::Tensor& lora_b, double scale, double dropout_p) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::lora_branch", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         double, double)>();
  return op.call(base_out, x, lora_a, lora_b, scale, dropout_p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_add_forward(const at::Tensor& base_out, const at::Tensor& x,
                                                                const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                                double scale, double dropout_p) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::lora_add_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double)>();
  return op.call(base_out, x, lora_a, lora_b, scale, dropout_p);
}

}  // namespace lorafuse
