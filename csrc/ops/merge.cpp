// C++ API of the merge ops → dispatcher.
#include <ATen/core/dispatch/Dispatcher.h>
#include <lorafuse/ops/merge.h>

namespace lorafuse {

at::Tensor lora_delta_weight(const at::Tensor& lora_a, const at::Tensor& lora_b, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::lora_delta_weight", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  return op.call(lora_a, lora_b, scale);
}

at::Tensor lora_merge(const at::Tensor& weight, const std::vector<at::Tensor>& lora_a,
                      const std::vector<at::Tensor>& lora_b, const std::vector<double>& scale,
                      const std::vector<at::Tensor>& magnitude) {
  using Magnitudes = std::optional<c10::List<std::optional<at::Tensor>>>;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::lora_merge", "")
                       .typed<at::Tensor(const at::Tensor&, at::TensorList, at::TensorList, c10::ArrayRef<double>,
                                         const Magnitudes&)>();
  Magnitudes m;
  if (!magnitude.empty()) {
    m.emplace();
    for (const auto& t : magnitude) m->push_back(t.defined() ? std::optional<at::Tensor>(t) : std::nullopt);
  }
  return op.call(weight, lora_a, lora_b, scale, m);
}

}  // namespace lorafuse
