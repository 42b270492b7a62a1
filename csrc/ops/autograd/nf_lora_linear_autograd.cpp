// Autograd of nf_lora_linear at the Autograd key: one node for the QLoRA layer. Saved: x, the quantized weight (its
// bytes and statistics, by reference), A, B, u = dropout(x)·Aᵀ and the dropout seed; the quantized weight never gets a
// gradient.
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <lorafuse/ops/nf.h>

#include "csrc/ops/common/nf_checks.h"

namespace lorafuse::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }
std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class NfLoraLinearFunction : public torch::autograd::Function<NfLoraLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                            const std::optional<at::Tensor>& offset, at::IntArrayRef format, int64_t out_features,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_a, const at::Tensor& lora_b,
                            double scale, double dropout_p) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, u, rng_state] = lorafuse::nf_lora_linear_forward(x, packed, absmax, nested_absmax, offset, format,
                                                              out_features, bias, lora_a, lora_b, scale, dropout_p);
    ctx->save_for_backward({x, packed, absmax, nested_absmax.value_or(at::Tensor()), offset.value_or(at::Tensor()),
                            lora_a, lora_b, u, rng_state});
    ctx->saved_data["format"] = format.vec();
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    // needs_input_grad counts the tensor inputs that were given: x, packed, absmax, [nested_absmax], [offset], [bias],
    // lora_a, lora_b
    const int64_t bias_edge = 3 + int64_t{given(nested_absmax)} + int64_t{given(offset)};
    ctx->saved_data["bias_edge"] = given(bias) ? bias_edge : int64_t{-1};
    ctx->saved_data["a_edge"] = bias_edge + int64_t{given(bias)};
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    variable_list result(12);  // one slot per forward argument
    const at::Tensor& dy = grads[0];
    const int64_t bias_edge = ctx->saved_data["bias_edge"].toInt();
    const auto a_edge = static_cast<size_t>(ctx->saved_data["a_edge"].toInt());
    const std::array<bool, 4> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(a_edge),
                                      ctx->needs_input_grad(a_edge + 1),
                                      bias_edge >= 0 && ctx->needs_input_grad(static_cast<size_t>(bias_edge))};
    if (!dy.defined() || !(mask[0] || mask[1] || mask[2] || mask[3])) return result;
    auto [gx, ga, gb, gbias] = lorafuse::nf_lora_linear_backward(
        dy, saved[0], saved[1], saved[2], optional(saved[3]), optional(saved[4]),
        ctx->saved_data["format"].toIntVector(), saved[5], saved[6], saved[7], saved[8],
        ctx->saved_data["scale"].toDouble(), ctx->saved_data["dropout_p"].toDouble(), mask);
    if (mask[0]) result[0] = gx;
    if (mask[3]) result[7] = gbias;
    if (mask[1]) result[8] = ga;
    if (mask[2]) result[9] = gb;
    return result;
  }
};

at::Tensor nf_lora_linear_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                   const std::optional<at::Tensor>& nested_absmax,
                                   const std::optional<at::Tensor>& offset, at::IntArrayRef format,
                                   int64_t out_features, const std::optional<at::Tensor>& bias,
                                   const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p) {
  const bool grad_mode = at::GradMode::is_enabled();
  if (grad_mode) detail::check_nf_statistics_frozen("lorafuse.nf_lora_linear", absmax, nested_absmax, offset);
  const bool bias_grad = given(bias) && bias->requires_grad();
  if (grad_mode && (x.requires_grad() || lora_a.requires_grad() || lora_b.requires_grad() || bias_grad)) {
    return NfLoraLinearFunction::apply(x, packed, absmax, nested_absmax, offset, format, out_features, bias, lora_a,
                                       lora_b, scale, dropout_p);
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // nothing to differentiate: the plain forward
  return lorafuse::nf_lora_linear(x, packed, absmax, nested_absmax, offset, format, out_features, bias, lora_a, lora_b,
                                  scale, dropout_p);
}

}  // namespace
}  // namespace lorafuse::autograd

TORCH_LIBRARY_IMPL(lorafuse, Autograd, m) {
  m.impl("nf_lora_linear", &lorafuse::autograd::nf_lora_linear_autograd);
  m.impl("nf_lora_linear_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("nf_lora_linear_backward", torch::autograd::autogradNotImplementedFallback());
}
