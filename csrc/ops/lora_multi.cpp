// C++ API of the multi-adapter ops → dispatcher.
#include <ATen/core/dispatch/Dispatcher.h>
#include <lorafuse/ops/lora_multi.h>

namespace lorafuse {

LoraSegments lora_segments(const at::Tensor& row_adapter, int64_t num_adapters) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::lora_segments", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>();
  auto [order, offsets] = op.call(row_adapter, num_adapters);
  return {order, offsets};
}

at::Tensor lora_multi_add(const at::Tensor& base_out, const at::Tensor& x, at::TensorList lora_a, at::TensorList lora_b,
                          at::ArrayRef<double> scale, const LoraSegments& segments, double dropout_p) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::lora_multi_add", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList,
                                         at::ArrayRef<double>, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(base_out, x, lora_a, lora_b, scale, segments.order, segments.offsets, dropout_p);
}

std::tuple<at::Tensor, at::Tensor> lora_multi_add_forward(const at::Tensor& base_out, const at::Tensor& x,
                                                          at::TensorList lora_a, at::TensorList lora_b,
                                                          at::ArrayRef<double> scale, const LoraSegments& segments,
                                                          double dropout_p) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::lora_multi_add_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, at::TensorList,
                                                                 at::TensorList, at::ArrayRef<double>,
                                                                 const at::Tensor&, const at::Tensor&, double)>();
  return op.call(base_out, x, lora_a, lora_b, scale, segments.order, segments.offsets, dropout_p);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> lora_multi_add_backward(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList lora_a, at::TensorList lora_b,
    at::ArrayRef<double> scale, const LoraSegments& segments, const at::Tensor& rng_state, double dropout_p,
    std::array<bool, 3> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::lora_multi_add_backward", "")
                       .typed<std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>(
                           const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, at::ArrayRef<double>,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, double, std::array<bool, 3>)>();
  return op.call(grad_out, x, lora_a, lora_b, scale, segments.order, segments.offsets, rng_state, dropout_p,
                 output_mask);
}

at::Tensor lora_token_add(const at::Tensor& base_out, const at::Tensor& x, at::TensorList lora_a, at::TensorList lora_b,
                          at::ArrayRef<double> scale, const at::Tensor& row_adapter) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::lora_token_add", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList,
                                         at::ArrayRef<double>, const at::Tensor&)>();
  return op.call(base_out, x, lora_a, lora_b, scale, row_adapter);
}

}  // namespace lorafuse
