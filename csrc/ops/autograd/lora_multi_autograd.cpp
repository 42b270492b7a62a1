// Autograd of lora_multi_add and lora_token_add at the Autograd key: grad base_out = dY; x's LoRA terms and every
// adapter's gradients through lora_multi_add_backward (each adapter's from its own rows).
#include <ATen/core/grad_mode.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <lorafuse/ops/lora_multi.h>

#include <algorithm>
#include <vector>

namespace lorafuse::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The gradients of a multi-adapter op whose autograd inputs are base_out, x, n A's, n B's and `trailing` more
// (non-differentiable) ones; saved holds x, two entries, the rng_state-or-unused slot, then the A's and B's.
variable_list adapter_backward(AutogradContext* ctx, const at::Tensor& dy, const variable_list& saved, size_t trailing,
                               const LoraSegments& segments, const at::Tensor& rng_state, double dropout_p) {
  const auto n = static_cast<size_t>(ctx->saved_data["adapters"].toInt());
  variable_list result(2 + 2 * n + trailing);
  if (!dy.defined()) return result;
  if (ctx->needs_input_grad(0)) result[0] = dy;
  bool want_a = false, want_b = false;
  for (size_t i = 0; i < n; ++i) {
    want_a = want_a || ctx->needs_input_grad(2 + i);
    want_b = want_b || ctx->needs_input_grad(2 + n + i);
  }
  const std::array<bool, 3> mask = {ctx->needs_input_grad(1), want_a, want_b};
  if (!(mask[0] || mask[1] || mask[2])) return result;
  const std::vector<at::Tensor> a(saved.begin() + 4, saved.begin() + 4 + static_cast<std::ptrdiff_t>(n));
  const std::vector<at::Tensor> b(saved.begin() + 4 + static_cast<std::ptrdiff_t>(n), saved.end());
  const auto scale = ctx->saved_data["scale"].toDoubleVector();
  auto [gx, ga, gb] =
      lorafuse::lora_multi_add_backward(dy, saved[0], a, b, scale, segments, rng_state, dropout_p, mask);
  if (mask[0]) result[1] = gx;
  for (size_t i = 0; i < n; ++i) {
    if (ctx->needs_input_grad(2 + i)) result[2 + i] = ga[i];
    if (ctx->needs_input_grad(2 + n + i)) result[2 + n + i] = gb[i];
  }
  return result;
}

class LoraMultiAddFunction : public torch::autograd::Function<LoraMultiAddFunction> {
 public:
  // The inputs autograd tracks, in order: base_out, x, lora_a[0 .. n), lora_b[0 .. n), order, offsets (the lists
  // count one input per tensor); scale and dropout_p are not tensors.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& base_out, const at::Tensor& x,
                            at::TensorList lora_a, at::TensorList lora_b, const std::vector<double>& scale,
                            const at::Tensor& order, const at::Tensor& offsets, double dropout_p) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, rng_state] =
        lorafuse::lora_multi_add_forward(base_out, x, lora_a, lora_b, scale, LoraSegments{order, offsets}, dropout_p);
    std::vector<at::Tensor> saved = {x, order, offsets, rng_state};
    saved.insert(saved.end(), lora_a.begin(), lora_a.end());
    saved.insert(saved.end(), lora_b.begin(), lora_b.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["adapters"] = static_cast<int64_t>(lora_a.size());
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    // inputs: base_out, x, n A's, n B's, then scale, order, offsets, dropout_p
    return adapter_backward(ctx, grads[0], saved, /*trailing=*/4, LoraSegments{saved[1], saved[2]}, saved[3],
                            ctx->saved_data["dropout_p"].toDouble());
  }
};

class LoraTokenAddFunction : public torch::autograd::Function<LoraTokenAddFunction> {
 public:
  // Inputs: base_out, x, lora_a[0 .. n), lora_b[0 .. n), row_adapter (scale is not a tensor).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& base_out, const at::Tensor& x,
                            at::TensorList lora_a, at::TensorList lora_b, const std::vector<double>& scale,
                            const at::Tensor& row_adapter) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor y = lorafuse::lora_token_add(base_out, x, lora_a, lora_b, scale, row_adapter);
    std::vector<at::Tensor> saved = {x, row_adapter, at::Tensor(), at::Tensor()};
    saved.insert(saved.end(), lora_a.begin(), lora_a.end());
    saved.insert(saved.end(), lora_b.begin(), lora_b.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["adapters"] = static_cast<int64_t>(lora_a.size());
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return variable_list(2 + 2 * static_cast<size_t>(ctx->saved_data["adapters"].toInt()) + 2);
    // the rows grouped once here: the backward is lora_multi_add's without dropout
    const LoraSegments segments = lorafuse::lora_segments(saved[1], ctx->saved_data["adapters"].toInt());
    const at::Tensor rng_state = at::zeros({2}, saved[0].options().dtype(at::kLong));
    return adapter_backward(ctx, grads[0], saved, /*trailing=*/2, segments, rng_state, 0.0);
  }
};

// Whether autograd must record the op: grad mode on and some differentiable input requiring grad.
bool records(const at::Tensor& base_out, const at::Tensor& x, at::TensorList lora_a, at::TensorList lora_b) {
  const auto needs = [](const at::Tensor& t) { return t.requires_grad(); };
  return at::GradMode::is_enabled() &&
         (base_out.requires_grad() || x.requires_grad() || std::any_of(lora_a.begin(), lora_a.end(), needs) ||
          std::any_of(lora_b.begin(), lora_b.end(), needs));
}

at::Tensor lora_multi_add_autograd(const at::Tensor& base_out, const at::Tensor& x, at::TensorList lora_a,
                                   at::TensorList lora_b, at::ArrayRef<double> scale, const at::Tensor& order,
                                   const at::Tensor& offsets, double dropout_p) {
  if (records(base_out, x, lora_a, lora_b)) {
    return LoraMultiAddFunction::apply(base_out, x, lora_a, lora_b, scale.vec(), order, offsets, dropout_p);
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return lorafuse::lora_multi_add(base_out, x, lora_a, lora_b, scale, LoraSegments{order, offsets}, dropout_p);
}

at::Tensor lora_token_add_autograd(const at::Tensor& base_out, const at::Tensor& x, at::TensorList lora_a,
                                   at::TensorList lora_b, at::ArrayRef<double> scale, const at::Tensor& row_adapter) {
  if (records(base_out, x, lora_a, lora_b)) {
    return LoraTokenAddFunction::apply(base_out, x, lora_a, lora_b, scale.vec(), row_adapter);
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return lorafuse::lora_token_add(base_out, x, lora_a, lora_b, scale, row_adapter);
}

}  // namespace
}  // namespace lorafuse::autograd

TORCH_LIBRARY_IMPL(lorafuse, Autograd, m) {
  m.impl("lora_multi_add", &lorafuse::autograd::lora_multi_add_autograd);
  m.impl("lora_multi_add_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("lora_multi_add_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("lora_token_add", &lorafuse::autograd::lora_token_add_autograd);
}
