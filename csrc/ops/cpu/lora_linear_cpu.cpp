// CPU kernels of lora_linear. The GEMMs go through ATen (the CPU BLAS); the expand is accumulated into
// the base GEMM's output in place (beta = 1), never added as a separate [T, out] tensor.
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "csrc/ops/common/lora_linear_checks.h"
#include "csrc/ops/cpu/dropout_cpu.h"
#include "csrc/ops/cpu/lora_linear_cpu.h"

namespace lorafuse::cpu {
namespace {

constexpr const char* kOp = "lorafuse.lora_linear";

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                       const std::optional<at::Tensor>& bias,
                                                                       const at::Tensor& lora_a,
                                                                       const at::Tensor& lora_b, double scale,
                                                                       double dropout_p) {
  detail::check_lora_linear_args(kOp, x, weight, bias, lora_a, lora_b, scale, dropout_p);
  const int64_t in = x.size(-1), out = weight.size(0);
  const at::ScalarType acc = detail::lora_acc_dtype(x, lora_a);
  const at::Tensor x2 = x.reshape({detail::leading_numel(x.sizes()), in});  // [T, in]

  uint64_t seed = 0;
  at::Tensor rng_state = forward_rng_state(x, dropout_p, seed);

  const at::ScalarType xt = x.scalar_type();
  at::Tensor u = lora_shrink(x2, lora_a.to(acc), seed, /*offset=*/0, dropout_p);  // [T, r]
  // The LoRA term (with the bias folded in as one more rank: [scale·u | 1]·[B | bias]ᵀ) is written first;
  // the base GEMM then accumulates x·Wᵀ onto it with beta = 1, so the output is written once and read
  // once inside the compute-bound GEMM, as the base linear alone does with its bias.
  at::Tensor u_ext = u.mul(scale), b_ext = lora_b;
  if (bias.has_value() && bias->defined()) {
    u_ext = at::cat({u_ext, at::ones({u.size(0), 1}, u.options())}, 1);  // [T, r + 1]
    b_ext = at::cat({lora_b.to(xt), bias->unsqueeze(1)}, 1);             // [out, r + 1]
  }
  at::Tensor y2 = at::mm(u_ext.to(xt), b_ext.to(xt).t());  // [T, out]
  y2.addmm_(x2, weight.t(), /*beta=*/1, /*alpha=*/1);
  return {y2.view(detail::with_last(x.sizes(), out)), u, rng_state};
}

at::Tensor lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p) {
  return std::get<0>(lora_linear_forward_cpu(x, weight, bias, lora_a, lora_b, scale, dropout_p));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& rng_state, double scale, double dropout_p,
    std::array<bool, 4> output_mask) {
  detail::check_lora_linear_backward_args("lorafuse.lora_linear_backward", grad_out, x, weight, lora_a, lora_b, u,
                                          rng_state, scale, dropout_p);
  const auto [need_x, need_a, need_b, need_bias] = output_mask;
  const int64_t in = x.size(-1), out = lora_b.size(0);
  const at::ScalarType acc = u.scalar_type();
  const int64_t tokens = detail::leading_numel(x.sizes());
  const at::Tensor x2 = x.reshape({tokens, in});           // [T, in]
  const at::Tensor dy2 = grad_out.reshape({tokens, out});  // [T, out]
  // (seed, offset) as the forward recorded them (offset is 0 on the CPU; a CUDA forward records its own)
  const int64_t* rng = rng_state.const_data_ptr<int64_t>();
  const uint64_t seed = dropout_p > 0.0 ? static_cast<uint64_t>(rng[0]) : 0;
  const uint64_t offset = dropout_p > 0.0 ? static_cast<uint64_t>(rng[1]) : 0;

  at::Tensor grad_x = at::empty({0}, x.options());
  at::Tensor grad_a = at::empty({0}, lora_a.options());
  at::Tensor grad_b = at::empty({0}, lora_b.options());
  at::Tensor grad_bias = at::empty({0}, x.options());

  const bool need_v = need_x || need_a;
  const int64_t r = lora_a.size(0);
  at::Tensor dy_acc;  // [T, out] in the accumulation dtype
  if (need_v || need_b || need_bias) dy_acc = dy2.scalar_type() == acc ? dy2 : dy2.to(acc);
  if (need_b || need_bias) {
    // dB and dbias both reduce dY over T: one GEMM [u | 1]ᵀ·dY = [dBᵀ/scale ; dbias] ([r + 1, out]), with
    // dY as the untransposed operand (the faster orientation for the CPU BLAS).
    const at::Tensor lhs = need_bias ? at::cat({u, at::ones({tokens, 1}, u.options())}, 1) : u;      // [T, r (+1)]
    const at::Tensor red = at::mm(lhs.t(), dy_acc);                                                  // [r (+1), out]
    if (need_b) grad_b = red.narrow(0, 0, r).t().contiguous().mul_(scale).to(lora_b.scalar_type());  // [out, r]
    if (need_bias) grad_bias = red.select(0, r).to(x.scalar_type(), /*non_blocking=*/false, /*copy=*/true);  // [out]
  }
  at::Tensor v;  // [T, r] = dY·B
  if (need_v) v = at::mm(dy_acc, lora_b.to(acc));
  // dX: the LoRA term scale·(v·A)⊙mask/(1-p) first, then the frozen base's dY·W accumulated onto it (lora_add has no
  // weight: its base's own backward gives that part). The mask is regenerated once for dX and dA's dropout(x) together.
  at::Tensor gx2;  // [T, in]
  if (need_x) gx2 = at::mm(v.mul(scale).to(x.scalar_type()), lora_a.to(x.scalar_type()));
  if (need_a) {
    grad_a = lora_shrink_backward(x2, v, seed, offset, dropout_p, need_x ? &gx2 : nullptr)
                 .mul_(scale)
                 .to(lora_a.scalar_type());  // [r, in]
  } else if (need_x && dropout_p > 0.0) {
    dropout_mask_(gx2, seed, offset, dropout_p);
  }
  if (need_x) {
    if (weight.has_value() && weight->defined()) gx2.addmm_(dy2, *weight, /*beta=*/1, /*alpha=*/1);
    grad_x = gx2.view(x.sizes());
  }
  return {grad_x, grad_a, grad_b, grad_bias};
}

}  // namespace lorafuse::cpu

TORCH_LIBRARY_IMPL(lorafuse, CPU, m) {
  m.impl("lora_linear", &lorafuse::cpu::lora_linear_cpu);
  m.impl("lora_linear_forward", &lorafuse::cpu::lora_linear_forward_cpu);
  m.impl("lora_linear_backward", &lorafuse::cpu::lora_linear_backward_cpu);
}
