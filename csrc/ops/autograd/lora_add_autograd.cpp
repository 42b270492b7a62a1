// Autograd of lora_add at the Autograd key: grad base_out = dY; the LoRA gradients through
// lora_linear_backward without weight (the base's own backward covers the base's part of dX).
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <lorafuse/ops/lora_add.h>
#include <lorafuse/ops/lora_linear.h>

namespace lorafuse::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class LoraAddFunction : public torch::autograd::Function<LoraAddFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& base_out, const at::Tensor& x,
                            const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, u, rng_state] = lorafuse::lora_add_forward(base_out, x, lora_a, lora_b, scale, dropout_p);
    ctx->save_for_backward({x, lora_a, lora_b, u, rng_state});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    variable_list result(6);
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return result;
    if (ctx->needs_input_grad(0)) result[0] = dy;
    const std::array<bool, 4> mask = {ctx->needs_input_grad(1), ctx->needs_input_grad(2), ctx->needs_input_grad(3),
                                      false};
    if (!(mask[0] || mask[1] || mask[2])) return result;
    const at::Tensor& x = saved[0];
    // dY has base_out's dtype; the LoRA backward reads it in x's (a copy only when they differ).
    const at::Tensor dy_x = dy.scalar_type() == x.scalar_type() ? dy : dy.to(x.scalar_type());
    auto [gx, ga, gb, gbias] =
        lorafuse::lora_linear_backward(dy_x, x, std::nullopt, saved[1], saved[2], saved[3], saved[4],
                                       ctx->saved_data["scale"].toDouble(), ctx->saved_data["dropout_p"].toDouble(),
                                       mask);
    if (mask[0]) result[1] = gx;
    if (mask[1]) result[2] = ga;
    if (mask[2]) result[3] = gb;
    return result;
  }
};

at::Tensor lora_add_autograd(const at::Tensor& base_out, const at::Tensor& x, const at::Tensor& lora_a,
                             const at::Tensor& lora_b, double scale, double dropout_p) {
  if (at::GradMode::is_enabled() &&
      (base_out.requires_grad() || x.requires_grad() || lora_a.requires_grad() || lora_b.requires_grad())) {
    return LoraAddFunction::apply(base_out, x, lora_a, lora_b, scale, dropout_p);
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return lorafuse::lora_add(base_out, x, lora_a, lora_b, scale, dropout_p);
}

}  // namespace
}  // namespace lorafuse::autograd

TORCH_LIBRARY_IMPL(lorafuse, Autograd, m) {
  m.impl("lora_add", &lorafuse::autograd::lora_add_autograd);
  m.impl("lora_add_forward", torch::autograd::autogradNotImplementedFallback());
}
