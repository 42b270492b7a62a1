// Autograd of nf_linear at the Autograd key: dX = dY·W through nf_linear_backward (tile by tile), dBias = ΣdY;
// the quantized weight and its statistics never get a gradient.
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

class NfLinearFunction : public torch::autograd::Function<NfLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                            const std::optional<at::Tensor>& offset, at::IntArrayRef format, int64_t out_features,
                            const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({packed, absmax, nested_absmax.value_or(at::Tensor()), offset.value_or(at::Tensor())});
    ctx->saved_data["format"] = format.vec();
    ctx->saved_data["in_features"] = x.size(-1);
    ctx->saved_data["bias_dtype"] = bias.has_value() && bias->defined() ? bias->scalar_type() : x.scalar_type();
    // needs_input_grad counts tensor inputs only: x, packed, absmax, then nested_absmax and offset when given
    const auto given = [](const std::optional<at::Tensor>& t) { return t.has_value() && t->defined() ? 1 : 0; };
    ctx->saved_data["bias_edge"] = given(bias) ? int64_t{3} + given(nested_absmax) + given(offset) : int64_t{-1};
    return lorafuse::nf_linear(x, packed, absmax, nested_absmax, offset, format, out_features, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    variable_list result(8);
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return result;
    const auto optional = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
    if (ctx->needs_input_grad(0)) {
      result[0] =
          lorafuse::nf_linear_backward(dy, saved[0], saved[1], optional(saved[2]), optional(saved[3]),
                                       ctx->saved_data["format"].toIntVector(), ctx->saved_data["in_features"].toInt());
    }
    const int64_t bias_edge = ctx->saved_data["bias_edge"].toInt();
    if (bias_edge >= 0 && ctx->needs_input_grad(static_cast<size_t>(bias_edge))) {
      result[7] = dy.reshape({-1, dy.size(-1)}).sum(0).to(ctx->saved_data["bias_dtype"].toScalarType());
    }
    return result;
  }
};

at::Tensor nf_linear_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                              const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                              at::IntArrayRef format, int64_t out_features, const std::optional<at::Tensor>& bias) {
  const bool bias_grad = bias.has_value() && bias->defined() && bias->requires_grad();
  // the quantized weight never trains: a statistic that asks for a gradient is refused
  if (at::GradMode::is_enabled())
    detail::check_nf_statistics_frozen("lorafuse.nf_linear", absmax, nested_absmax, offset);
  if (at::GradMode::is_enabled() && (x.requires_grad() || bias_grad)) {
    return NfLinearFunction::apply(x, packed, absmax, nested_absmax, offset, format, out_features, bias);
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return lorafuse::nf_linear(x, packed, absmax, nested_absmax, offset, format, out_features, bias);
}

}  // namespace
}  // namespace lorafuse::autograd

TORCH_LIBRARY_IMPL(lorafuse, Autograd, m) {
  m.impl("nf_linear", &lorafuse::autograd::nf_linear_autograd);
  m.impl("nf_linear_backward", torch::autograd::autogradNotImplementedFallback());
}
