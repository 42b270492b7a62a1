// Host wrapper of the multi-adapter CUDA kernels (segmented lora_multi_add, per-token lora_token_add) and
// TORCH_LIBRARY_IMPL(lorafuse, CUDA, m). Order: checks → device guard → current stream → dtype dispatch → launch →
// launch check. The backward is lora_multi_add's composite (csrc/ops/common/lora_multi_backward.cpp: cuBLAS GEMMs per
// adapter), its dropout masks from rows_dropout_kernel.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <lorafuse/ops/lora_multi.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "csrc/ops/common/lora_multi_backward.h"
#include "csrc/ops/common/lora_multi_checks.h"
#include "cuda/common/launch.h"
#include "cuda/lora_multi/lora_multi_launch.cuh"

namespace lorafuse::cuda {
namespace {

constexpr const char* kOp = "lorafuse.lora_multi_add";
constexpr int64_t kMaxRank = 64 * 64;  // MultiPlan's rank tiles

// The adapters of one call in one dtype (their own when they share it, else float32), contiguous and kept alive
// here, and their slots {A, B, r, scale} copied to the device.
struct Slots {
  std::vector<at::Tensor> a, b;
  std::vector<int64_t> ranks;
  at::ScalarType dtype = at::kFloat;
  int64_t max_rank = 0;
  at::Tensor device;  // AdapterSlot [n] as bytes on x's device
  const AdapterSlot* ptr() const { return reinterpret_cast<const AdapterSlot*>(device.const_data_ptr()); }
};

Slots make_slots(const char* op, const at::Tensor& x, at::TensorList lora_a, at::TensorList lora_b,
                 at::ArrayRef<double> scale) {
  Slots s;
  const auto n = static_cast<int64_t>(lora_a.size());
  s.dtype = lora_a[0].scalar_type();
  for (int64_t i = 0; i < n; ++i) {
    if (lora_a[i].scalar_type() != s.dtype || lora_b[i].scalar_type() != s.dtype) s.dtype = at::kFloat;
  }
  at::Tensor host = at::empty({n * static_cast<int64_t>(sizeof(AdapterSlot))},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* slots = reinterpret_cast<AdapterSlot*>(host.data_ptr());
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = lora_a[i].size(0);
    TORCH_CHECK_VALUE(r <= kMaxRank, op, " (adapter ", i, "): lora_a: the CUDA kernels take ranks up to ", kMaxRank,
                      "; found r = ", r);
    s.a.push_back(lora_a[i].to(s.dtype).contiguous());
    s.b.push_back(lora_b[i].to(s.dtype).contiguous());
    s.ranks.push_back(r);
    s.max_rank = std::max(s.max_rank, r);
    slots[i] = AdapterSlot{s.a.back().const_data_ptr(), s.b.back().const_data_ptr(), r, static_cast<float>(scale[i])};
  }
  s.device = host.to(x.device(), /*non_blocking=*/true);  // the pinned buffer lives until the copy is done
  return s;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_multi_add_forward_cuda(const at::Tensor& base_out, const at::Tensor& x,
                                                               at::TensorList lora_a, at::TensorList lora_b,
                                                               at::ArrayRef<double> scale, const at::Tensor& order,
                                                               const at::Tensor& offsets, double dropout_p) {
  // values: the kernels index rows by order and offsets, so they are checked (one small read) before any launch
  detail::check_lora_multi_add_args(kOp, base_out, x, lora_a, lora_b, scale, order, offsets, dropout_p,
                                    /*values=*/true);
  check_cuda_dtype(x, kOp);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const CudaLauncher launch{at::cuda::getCurrentCUDAStream()};
  const int64_t out = base_out.size(-1);
  const at::Tensor x2 = rows_view(x);  // [T, in]
  const int64_t tokens = x2.size(0);
  at::Tensor y2 = base_out.reshape({tokens, out}).clone(at::MemoryFormat::Contiguous);  // [T, out]
  at::Tensor rng_state = at::empty({2}, x.options().dtype(at::kLong));
  rng_state.zero_();  // defined even when no kernel runs; the first shrink launch records (seed, offset) here
  const DropoutParams drop = forward_dropout(dropout_p, rng_state, x);
  const Slots slots = make_slots(kOp, x, lora_a, lora_b, scale);
  const at::Tensor order_c = order.contiguous(), offsets_c = offsets.contiguous();
  // no columns of x (in = 0): every branch is 0 and y is base_out
  const int64_t sorted_rows = x2.size(1) == 0 ? 0 : order_c.size(0);
  const MultiPlan plan = plan_multi(sorted_rows, slots.ranks.data(), static_cast<int64_t>(slots.ranks.size()));
  at::Tensor u = at::empty({order_c.size(0), slots.max_rank}, x.options().dtype(at::kFloat));  // [T', max r]
  dispatch_lora_types(x.scalar_type(), slots.dtype, kOp, [&](auto xt, auto at_) {
    using Tx = typename decltype(xt)::type;
    using Ta = typename decltype(at_)::type;
    MultiShrinkParams sp{};
    sp.x = x2.const_data_ptr();
    sp.ldx = x2.stride(0);
    sp.in = x2.size(1);
    sp.adapters = slots.ptr();
    sp.num_adapters = plan.num_adapters;
    sp.order = order_c.const_data_ptr<int64_t>();
    sp.offsets = offsets_c.const_data_ptr<int64_t>();
    sp.u = u.data_ptr<float>();
    sp.ldu = slots.max_rank;
    sp.drop = drop;
    run_multi_shrink<Tx, Ta>(launch, sp, plan);  // u = drop(x[order])·Aᵢᵀ
    dispatch_float_types(
        y2.scalar_type(), kOp,
        [&](auto yt) {
          using Ty = typename decltype(yt)::type;
          MultiExpandParams ep{};
          ep.u = u.const_data_ptr<float>();
          ep.ldu = slots.max_rank;
          ep.adapters = slots.ptr();
          ep.num_adapters = plan.num_adapters;
          ep.order = sp.order;
          ep.offsets = sp.offsets;
          ep.y = y2.data_ptr();
          ep.out = out;
          run_multi_expand<Ty, Ta>(launch, ep, plan);  // y[order] += scaleᵢ·u·Bᵢᵀ
        },
        "base_out");
  });
  return {y2.view(base_out.sizes()), rng_state};
}

at::Tensor lora_multi_add_cuda(const at::Tensor& base_out, const at::Tensor& x, at::TensorList lora_a,
                               at::TensorList lora_b, at::ArrayRef<double> scale, const at::Tensor& order,
                               const at::Tensor& offsets, double dropout_p) {
  return std::get<0>(lora_multi_add_forward_cuda(base_out, x, lora_a, lora_b, scale, order, offsets, dropout_p));
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> lora_multi_add_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList lora_a, at::TensorList lora_b,
    at::ArrayRef<double> scale, const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& rng_state,
    double dropout_p, std::array<bool, 3> output_mask) {
  constexpr const char* op = "lorafuse.lora_multi_add_backward";
  detail::check_lora_multi_add_backward_args(op, grad_out, x, lora_a, lora_b, scale, order, offsets, rng_state,
                                             dropout_p);
  check_cuda_dtype(x, op);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const CudaLauncher launch{at::cuda::getCurrentCUDAStream()};
  const at::Tensor rng = rng_state.to(x.device()).contiguous();
  detail::RowMask mask;
  if (dropout_p > 0.0) {
    mask = [&](at::Tensor& rows, const at::Tensor& row_ids) {
      TORCH_INTERNAL_ASSERT(rows.scalar_type() == at::kFloat && rows.is_contiguous());
      RowsDropoutParams p{};
      p.rows = rows.data_ptr<float>();
      p.row_ids = row_ids.const_data_ptr<int64_t>();
      p.n = rows.size(0);
      p.in = rows.size(1);
      p.drop = dropout_params(dropout_p);
      p.drop.rng_in = rng.const_data_ptr<int64_t>();
      run_rows_dropout(launch, p);
    };
  }
  return detail::lora_multi_backward(grad_out, x, lora_a, lora_b, scale, order, offsets, output_mask, mask);
}

at::Tensor lora_token_add_cuda(const at::Tensor& base_out, const at::Tensor& x, at::TensorList lora_a,
                               at::TensorList lora_b, at::ArrayRef<double> scale, const at::Tensor& row_adapter) {
  constexpr const char* op = "lorafuse.lora_token_add";
  detail::check_lora_token_add_args(op, base_out, x, lora_a, lora_b, scale, row_adapter, /*values=*/true);
  check_cuda_dtype(x, op);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const CudaLauncher launch{at::cuda::getCurrentCUDAStream()};
  const int64_t out = base_out.size(-1);
  const at::Tensor x2 = rows_view(x);  // [T, in]
  const int64_t tokens = x2.size(0);
  at::Tensor y2 = base_out.reshape({tokens, out}).clone(at::MemoryFormat::Contiguous);  // [T, out]
  const Slots slots = make_slots(op, x, lora_a, lora_b, scale);
  const at::Tensor rows = row_adapter.contiguous();
  at::Tensor u = at::empty({tokens, slots.max_rank}, x.options().dtype(at::kFloat));  // [T, max r]
  dispatch_lora_types(x.scalar_type(), slots.dtype, op, [&](auto xt, auto at_) {
    using Tx = typename decltype(xt)::type;
    using Ta = typename decltype(at_)::type;
    dispatch_float_types(
        y2.scalar_type(), op,
        [&](auto yt) {
          using Ty = typename decltype(yt)::type;
          TokenParams p{};
          p.x = x2.const_data_ptr();
          p.ldx = x2.stride(0);
          p.in = x2.size(1);
          p.adapters = slots.ptr();
          p.row_adapter = rows.const_data_ptr<int64_t>();
          p.u = u.data_ptr<float>();
          p.ldu = slots.max_rank;
          p.y = y2.data_ptr();
          p.out = out;
          run_token<Tx, Ta, Ty>(launch, p, tokens, slots.max_rank);
        },
        "base_out");
  });
  return y2.view(base_out.sizes());
}

}  // namespace lorafuse::cuda

TORCH_LIBRARY_IMPL(lorafuse, CUDA, m) {
  m.impl("lora_multi_add", &lorafuse::cuda::lora_multi_add_cuda);
  m.impl("lora_multi_add_forward", &lorafuse::cuda::lora_multi_add_forward_cuda);
  m.impl("lora_multi_add_backward", &lorafuse::cuda::lora_multi_add_backward_cuda);
  m.impl("lora_token_add", &lorafuse::cuda::lora_token_add_cuda);
}
