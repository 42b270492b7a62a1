// C++ API of lora_embedding → dispatcher.
#include <ATen/core/dispatch/Dispatcher.h>
#include <lorafuse/ops/lora_embedding.h>

namespace lorafuse {

at::Tensor lora_embedding(const at::Tensor& base_out, const at::Tensor& indices, const at::Tensor& lora_a,
                          const at::Tensor& lora_b, double scale, int64_t padding_idx, bool scale_grad_by_freq,
                          bool sparse) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorafuse::lora_embedding", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         double, int64_t, bool, bool)>();
  return op.call(base_out, indices, lora_a, lora_b, scale, padding_idx, scale_grad_by_freq, sparse);
}

}  // namespace lorafuse
