// Autograd of lora_linear, in C++ at the Autograd key, so LibTorch programs train without Python.
// Saved for backward: x, u = dropout(x)·Aᵀ [T, r] and the dropout seed; references to weight, A and B.
// The dropout mask itself is never stored: backward regenerates it from the seed.
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <lorafuse/ops.h>

namespace lorafuse::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, double scale, double dropout_p) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, u, rng_state] = lorafuse::lora_linear_forward(x, weight, bias, lora_a, lora_b, scale, dropout_p);
    ctx->save_for_backward({x, weight, lora_a, lora_b, u, rng_state});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // forward inputs: x, weight, bias, lora_a, lora_b, scale, dropout_p. needs_input_grad counts tensor
    // inputs only (an absent bias has no edge), while the returned list has one slot per forward input.
    const size_t edge_a = has_bias ? 3 : 2, edge_b = edge_a + 1;
    const std::array<bool, 4> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(edge_a),
                                      ctx->needs_input_grad(edge_b), has_bias && ctx->needs_input_grad(2)};
    variable_list result(7);
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2] || mask[3])) return result;
    auto [gx, ga, gb, gbias] = lorafuse::lora_linear_backward(
        grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5],
        ctx->saved_data["scale"].toDouble(), ctx->saved_data["dropout_p"].toDouble(), mask);
    if (mask[0]) result[0] = gx;
    if (mask[3]) result[2] = gbias;
    if (mask[1]) result[3] = ga;
    if (mask[2]) result[4] = gb;
    return result;
  }
};

at::Tensor lora_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p) {
  const bool grad_mode = at::GradMode::is_enabled();
  TORCH_CHECK_VALUE(!(grad_mode && weight.defined() && weight.requires_grad()),
                    "lorafuse.lora_linear: weight is the frozen base weight and never gets a gradient, but it has "
                    "requires_grad=True; call weight.requires_grad_(False) (LoRA trains lora_a, lora_b and bias)");
  const bool bias_grad = bias.has_value() && bias->defined() && bias->requires_grad();
  if (grad_mode && (x.requires_grad() || lora_a.requires_grad() || lora_b.requires_grad() || bias_grad)) {
    return LoraLinearFunction::apply(x, weight, bias, lora_a, lora_b, scale, dropout_p);
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // nothing to differentiate: the plain forward
  return lorafuse::lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p);
}

}  // namespace
}  // namespace lorafuse::autograd

TORCH_LIBRARY_IMPL(lorafuse, Autograd, m) {
  m.impl("lora_linear", &lorafuse::autograd::lora_linear_autograd);
  // The building blocks are not differentiable themselves: they run below autograd (so their kernels never
  // see requires_grad inputs), and backpropagating through their outputs (e.g. double backward of
  // lora_linear) raises "derivative for lorafuse::... is not implemented" instead of silently being wrong.
  m.impl("lora_linear_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("lora_linear_backward", torch::autograd::autogradNotImplementedFallback());
}
