// Host wrapper of the lora_linear CUDA kernels and TORCH_LIBRARY_IMPL(lorafuse, CUDA, m).
// Order in every entry point: checks → device guard → current stream → dtype dispatch → launch → launch check.
// The base GEMMs (x·Wᵀ forward, dY·W backward) are cuBLAS calls through ATen's addmm_, accumulating with
// beta = 1 onto the LoRA terms that the custom kernels wrote into the same output.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "csrc/ops/common/lora_linear_checks.h"
#include "cuda/common/launch.h"
#include "cuda/lora_linear/lora_linear_launch.cuh"

namespace lorafuse::cuda {
namespace {

constexpr const char* kOp = "lorafuse.lora_linear";

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                        const std::optional<at::Tensor>& bias,
                                                                        const at::Tensor& lora_a,
                                                                        const at::Tensor& lora_b, double scale,
                                                                        double dropout_p) {
  detail::check_lora_linear_args(kOp, x, weight, bias, lora_a, lora_b, scale, dropout_p);
  check_cuda_dtype(x, kOp);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const CudaLauncher launch{at::cuda::getCurrentCUDAStream()};

  const int64_t out = weight.size(0), r = lora_a.size(0);
  const at::Tensor x2 = rows_view(x);  // [T, in]
  const int64_t tokens = x2.size(0);
  const at::Tensor a = lora_a.contiguous(), b = lora_b.contiguous();
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) bias_c = bias->contiguous();

  at::Tensor y2 = at::empty({tokens, out}, x.options());                 // [T, out]
  at::Tensor u = at::empty({tokens, r}, x.options().dtype(at::kFloat));  // [T, r]
  at::Tensor rng_state = at::empty({2}, x.options().dtype(at::kLong));
  rng_state.zero_();  // defined even when no kernel runs (T = 0); the shrink records (seed, offset) here
  const DropoutParams drop = forward_dropout(dropout_p, rng_state, x);

  if (tokens > 0) {
    dispatch_lora_types(x.scalar_type(), lora_a.scalar_type(), kOp, [&](auto xt, auto at_) {
      using Tx = typename decltype(xt)::type;
      using Ta = typename decltype(at_)::type;
      ShrinkParams sp{};
      sp.x = x2.data_ptr();
      sp.ldx = x2.stride(0);
      sp.a = a.data_ptr();
      sp.u = u.data_ptr<float>();
      sp.tokens = tokens;
      sp.in = x2.size(1);
      sp.r = r;
      sp.drop = drop;
      run_shrink<Tx, Ta>(launch, sp);  // u = drop(x)·Aᵀ
      ExpandParams ep{};
      ep.u = u.const_data_ptr<float>();
      ep.b = b.data_ptr();
      ep.bias = bias_c.defined() ? bias_c.data_ptr() : nullptr;
      ep.y = y2.data_ptr();
      ep.tokens = tokens;
      ep.out = out;
      ep.r = r;
      ep.scale = static_cast<float>(scale);
      run_expand<Tx, Ta>(launch, ep);  // y = bias + scale·u·Bᵀ
    });
    if (out > 0) y2.addmm_(x2, weight.t(), /*beta=*/1, /*alpha=*/1);  // y += x·Wᵀ (cuBLAS, beta = 1)
  }
  return {y2.view(detail::with_last(x.sizes(), out)), u, rng_state};
}

// lora_add: the shrink kernel gives u = drop(x)·Aᵀ (fp32); the expand is a cuBLAS GEMM in fp32, accumulated with
// beta = 1 onto a copy of a float32 base output, else added once after rounding (as the CPU kernel does).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_add_forward_cuda(const at::Tensor& base_out, const at::Tensor& x,
                                                                     const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                                     double scale, double dropout_p) {
  constexpr const char* op = "lorafuse.lora_add";
  detail::check_lora_add_args(op, base_out, x, lora_a, lora_b, scale, dropout_p);
  check_cuda_dtype(x, op);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const CudaLauncher launch{at::cuda::getCurrentCUDAStream()};
  const int64_t out = base_out.size(-1), r = lora_a.size(0);
  const at::Tensor x2 = rows_view(x);  // [T, in]
  const int64_t tokens = x2.size(0);
  const at::Tensor a = lora_a.contiguous();
  at::Tensor u = at::empty({tokens, r}, x.options().dtype(at::kFloat));  // [T, r]
  at::Tensor rng_state = at::empty({2}, x.options().dtype(at::kLong));
  rng_state.zero_();
  const DropoutParams drop = forward_dropout(dropout_p, rng_state, x);
  at::Tensor y2 = base_out.reshape({tokens, out}).clone(at::MemoryFormat::Contiguous);  // [T, out]
  if (tokens > 0) {
    dispatch_lora_types(x.scalar_type(), lora_a.scalar_type(), op, [&](auto xt, auto at_) {
      using Tx = typename decltype(xt)::type;
      using Ta = typename decltype(at_)::type;
      ShrinkParams sp{};
      sp.x = x2.data_ptr();
      sp.ldx = x2.stride(0);
      sp.a = a.data_ptr();
      sp.u = u.data_ptr<float>();
      sp.tokens = tokens;
      sp.in = x2.size(1);
      sp.r = r;
      sp.drop = drop;
      run_shrink<Tx, Ta>(launch, sp);  // u = drop(x)·Aᵀ
    });
    if (out > 0) {  // y += scale·u·Bᵀ
      if (y2.scalar_type() == at::kFloat) {
        y2.addmm_(u, lora_b.to(at::kFloat).t(), /*beta=*/1, /*alpha=*/scale);
      } else {
        y2.add_(at::mm(u, lora_b.to(at::kFloat).t()).mul_(scale).to(y2.scalar_type()));
      }
    }
  }
  return {y2.view(base_out.sizes()), u, rng_state};
}

at::Tensor lora_add_cuda(const at::Tensor& base_out, const at::Tensor& x, const at::Tensor& lora_a,
                         const at::Tensor& lora_b, double scale, double dropout_p) {
  return std::get<0>(lora_add_forward_cuda(base_out, x, lora_a, lora_b, scale, dropout_p));
}

at::Tensor lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p) {
  return std::get<0>(lora_linear_forward_cuda(x, weight, bias, lora_a, lora_b, scale, dropout_p));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& rng_state, double scale, double dropout_p,
    std::array<bool, 4> output_mask) {
  constexpr const char* op = "lorafuse.lora_linear_backward";
  detail::check_lora_linear_backward_args(op, grad_out, x, weight, lora_a, lora_b, u, rng_state, scale, dropout_p);
  check_cuda_dtype(x, op);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const CudaLauncher launch{at::cuda::getCurrentCUDAStream()};
  const bool need_x = output_mask[0], need_a = output_mask[1], need_b = output_mask[2], need_bias = output_mask[3];

  const int64_t in = x.size(-1), out = lora_b.size(0), r = lora_a.size(0);
  const at::Tensor x2 = rows_view(x);                                       // [T, in]
  const at::Tensor dy2 = grad_out.reshape({x2.size(0), out}).contiguous();  // [T, out]
  const int64_t tokens = x2.size(0);
  const at::Tensor a = lora_a.contiguous(), b = lora_b.contiguous(), uc = u.contiguous();
  const at::Tensor rng = rng_state.contiguous();
  const auto f32 = x.options().dtype(at::kFloat);

  at::Tensor grad_x = need_x ? at::empty({tokens, in}, x.options()) : at::empty({0}, x.options());
  at::Tensor grad_a = need_a ? at::empty({r, in}, lora_a.options()) : at::empty({0}, lora_a.options());
  at::Tensor grad_b = need_b ? at::empty({out, r}, lora_b.options()) : at::empty({0}, lora_b.options());
  at::Tensor grad_bias = need_bias ? at::empty({out}, x.options()) : at::empty({0}, x.options());
  if (tokens == 0) {  // nothing flows back: zero gradients for the parameters
    if (need_a) grad_a.zero_();
    if (need_b) grad_b.zero_();
    if (need_bias) grad_bias.zero_();
  } else {
    const bool need_v = need_x || need_a;
    const BackwardPlan plan =
        plan_backward(tokens, in, out, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
    DropoutParams drop = dropout_params(dropout_p);
    if (drop.enabled) drop.rng_in = rng.const_data_ptr<int64_t>();
    // fp32 partials, summed in a fixed order by run_reduce
    at::Tensor v = need_v ? at::empty({tokens, r}, f32) : at::Tensor();  // [T, r]
    at::Tensor v_part = need_v ? at::empty({plan.out_col_tiles, tokens, r}, f32) : at::Tensor();
    at::Tensor db_part = need_b ? at::empty({plan.out_splits, out, r}, f32) : at::Tensor();
    at::Tensor bias_part = need_bias ? at::empty({plan.out_splits, out}, f32) : at::Tensor();
    at::Tensor da_part = need_a ? at::empty({plan.x_splits, r, in}, f32) : at::Tensor();

    dispatch_lora_types(x.scalar_type(), lora_a.scalar_type(), op, [&](auto xt, auto at_) {
      using Tx = typename decltype(xt)::type;
      using Ta = typename decltype(at_)::type;
      // one pass over dY: v = dY·B, dB = scale·dYᵀ·u, dbias = Σ_t dY
      GradOutParams gp{};
      gp.dy = dy2.data_ptr();
      gp.b = b.data_ptr();
      gp.u = uc.const_data_ptr<float>();
      gp.v_part = need_v ? v_part.data_ptr<float>() : nullptr;
      gp.db_part = need_b ? db_part.data_ptr<float>() : nullptr;
      gp.bias_part = need_bias ? bias_part.data_ptr<float>() : nullptr;
      gp.tokens = tokens;
      gp.out = out;
      gp.r = r;
      run_grad_out<Tx, Ta>(launch, gp, plan);
      if (need_v)
        run_reduce<float>(launch, v_part.const_data_ptr<float>(), plan.out_col_tiles, tokens * r, 1.f,
                          v.data_ptr<float>());
      if (need_b)
        run_reduce<Ta>(launch, db_part.const_data_ptr<float>(), plan.out_splits, out * r, static_cast<float>(scale),
                       device_ptr<Ta>(grad_b));
      if (need_bias)
        run_reduce<Tx>(launch, bias_part.const_data_ptr<float>(), plan.out_splits, out, 1.f, device_ptr<Tx>(grad_bias));
      if (!need_v) return;
      // one pass over x: dX's LoRA part = scale·(v·A)⊙mask/(1-p), dA = scale·vᵀ·drop(x)
      GradXParams xp{};
      xp.x = x2.data_ptr();
      xp.ldx = x2.stride(0);
      xp.a = a.data_ptr();
      xp.v = v.const_data_ptr<float>();
      xp.dx = need_x ? grad_x.data_ptr() : nullptr;
      xp.da_part = need_a ? da_part.data_ptr<float>() : nullptr;
      xp.tokens = tokens;
      xp.in = in;
      xp.r = r;
      xp.scale = static_cast<float>(scale);
      xp.drop = drop;
      run_grad_x<Tx, Ta>(launch, xp, plan);
      if (need_a)
        run_reduce<Ta>(launch, da_part.const_data_ptr<float>(), plan.x_splits, r * in, static_cast<float>(scale),
                       device_ptr<Ta>(grad_a));
    });
    // dX += dY·W (cuBLAS, beta = 1 onto the LoRA part written above); lora_add has no weight: its base's
    // own backward gives that part.
    if (need_x && weight.has_value() && weight->defined()) grad_x.addmm_(dy2, *weight, /*beta=*/1, /*alpha=*/1);
  }
  if (need_x) grad_x = grad_x.view(x.sizes());
  return {grad_x, grad_a, grad_b, grad_bias};
}

}  // namespace lorafuse::cuda

TORCH_LIBRARY_IMPL(lorafuse, CUDA, m) {
  m.impl("lora_linear", &lorafuse::cuda::lora_linear_cuda);
  m.impl("lora_linear_forward", &lorafuse::cuda::lora_linear_forward_cuda);
  m.impl("lora_linear_backward", &lorafuse::cuda::lora_linear_backward_cuda);
  m.impl("lora_add", &lorafuse::cuda::lora_add_cuda);
  m.impl("lora_add_forward", &lorafuse::cuda::lora_add_forward_cuda);
}
