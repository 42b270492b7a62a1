// Host wrapper of the lora_linear CUDA kernels and TORCH_LIBRARY_IMPL(lorafuse, CUDA, m).
// Order in every entry point: checks → device guard → current stream → dtype dispatch → launch → launch check.
// The base GEMMs (x·Wᵀ forward, dY·W backward) are cuBLAS calls through ATen's addmm_, accumulating with
// beta = 1 onto the LoRA terms that the custom kernels wrote into the same output.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>

#include "csrc/ops/common/lora_linear_checks.h"
#include "cuda/common/launch.h"
#include "cuda/common/static_switch.h"
#include "cuda/lora_linear/lora_linear_kernel.cuh"

namespace lorafuse::cuda {
namespace {

constexpr const char* kOp = "lorafuse.lora_linear";
constexpr int64_t kDecodeTokens = 16;  // T ≤ this takes the decode shrink
constexpr int kMaxRankTile = 64;

// x viewed as [T, in] with unit column stride (rows may be strided, e.g. a slice).
at::Tensor rows_view(const at::Tensor& x) {
  at::Tensor x2 = x.reshape({-1, x.size(-1)});
  if (x2.stride(1) != 1 || (x2.size(0) > 1 && x2.stride(0) < x2.size(1))) x2 = x2.contiguous();
  return x2;
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> v = sizes.vec();
  v.back() = last;
  return v;
}

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Token splits for the backward passes: enough blocks to fill the GPU (~4 per SM), each split a whole
// number of token tiles.
int64_t tokens_per_split(int64_t tokens, int64_t col_tiles, int64_t tile) {
  const int64_t want_splits = std::max<int64_t>(1, (4 * sm_count() + col_tiles - 1) / col_tiles);
  const int64_t tiles = ceil_div<int64_t>(tokens, tile);
  const int64_t splits = std::min<int64_t>(std::min<int64_t>(want_splits, tiles), 256);
  return ceil_div<int64_t>(tiles, splits) * tile;
}

DropoutParams forward_dropout(double p, at::Tensor& rng_state, const at::Tensor& x) {
  DropoutParams d;
  if (p <= 0.0) return d;
  d.enabled = true;
  d.threshold = philox::keep_threshold(p);
  d.inv_keep = static_cast<float>(1.0 / (1.0 - p));
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(std::nullopt,
                                                                    at::cuda::detail::getDefaultCUDAGenerator(
                                                                        x.device().index()));
  at::PhiloxCudaState st;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    st = gen->philox_cuda_state(4);  // our counters use (element / 4, offset): one offset step per call
  }
  if (st.captured_) {
    d.captured = true;
    d.seed_ptr = st.seed_.ptr;
    d.offset_ptr = st.offset_.ptr;
    d.offset_intragraph = st.offset_intragraph_;
  } else {
    d.seed = st.seed_.val;
    d.offset = st.offset_.val;
  }
  d.rng_out = rng_state.data_ptr<int64_t>();
  return d;
}

DropoutParams backward_dropout(double p, const at::Tensor& rng_state) {
  DropoutParams d;
  if (p <= 0.0) return d;
  d.enabled = true;
  d.threshold = philox::keep_threshold(p);
  d.inv_keep = static_cast<float>(1.0 / (1.0 - p));
  d.rng_in = rng_state.const_data_ptr<int64_t>();
  return d;
}

template <typename To>
void launch_reduce_splits(const at::Tensor& part, int64_t splits, int64_t n, float alpha, const at::Tensor& out,
                          cudaStream_t stream) {
  if (n == 0) return;
  reduce_splits_kernel<To><<<static_cast<unsigned>(ceil_div<int64_t>(n, kThreads)), kThreads, 0, stream>>>(
      part.const_data_ptr<float>(), splits, n, alpha, device_ptr<To>(out));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Tx, typename Ta>
void launch_shrink(const at::Tensor& x2, const at::Tensor& a, at::Tensor& u, const DropoutParams& drop,
                   cudaStream_t stream) {
  ShrinkParams p{};
  p.x = x2.data_ptr();
  p.ldx = x2.stride(0);
  p.a = a.data_ptr();
  p.u = u.data_ptr<float>();
  p.tokens = x2.size(0);
  p.in = x2.size(1);
  p.r = a.size(0);
  p.drop = drop;
  if (p.tokens <= kDecodeTokens) {
    p.r0 = 0;
    p.rc = static_cast<int>(p.r);
    lora_shrink_decode_kernel<Tx, Ta, kDecodeTokens><<<static_cast<unsigned>(p.r), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  for (int64_t r0 = 0; r0 < p.r; r0 += kMaxRankTile) {
    p.r0 = static_cast<int>(r0);
    p.rc = static_cast<int>(std::min<int64_t>(kMaxRankTile, p.r - r0));
    LORAFUSE_RANK_TILE_SWITCH(p.rc, R, [&] {
      constexpr int TPW = 64 / R;  // TPW·R = 64 accumulators per lane
      const int64_t tokens_per_block = (kThreads / 32) * TPW;
      const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(p.tokens, tokens_per_block)));
      lora_shrink_kernel<Tx, Ta, R, TPW><<<grid, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

template <typename Tx, typename Ta>
void launch_expand(const at::Tensor& u, const at::Tensor& b, const std::optional<at::Tensor>& bias, at::Tensor& y2,
                   double scale, cudaStream_t stream) {
  ExpandParams p{};
  p.u = u.const_data_ptr<float>();
  p.b = b.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.y = y2.data_ptr();
  p.tokens = y2.size(0);
  p.out = y2.size(1);
  p.r = b.size(1);
  p.scale = static_cast<float>(scale);
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(p.out, kThreads)),
                  static_cast<unsigned>(ceil_div<int64_t>(p.tokens, kExpandTokens)));
  lora_expand_kernel<Tx, Ta><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                        const std::optional<at::Tensor>& bias,
                                                                        const at::Tensor& lora_a,
                                                                        const at::Tensor& lora_b, double scale,
                                                                        double dropout_p) {
  detail::check_lora_linear_args(kOp, x, weight, bias, lora_a, lora_b, scale, dropout_p);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const int64_t in = x.size(-1), out = weight.size(0), r = lora_a.size(0);
  const at::Tensor x2 = rows_view(x);  // [T, in]
  const int64_t tokens = x2.size(0);
  const at::Tensor a = lora_a.contiguous(), b = lora_b.contiguous();
  std::optional<at::Tensor> bias_c;
  if (bias.has_value() && bias->defined()) bias_c = bias->contiguous();

  at::Tensor y2 = at::empty({tokens, out}, x.options());
  at::Tensor u = at::empty({tokens, r}, x.options().dtype(at::kFloat));
  at::Tensor rng_state = at::empty({2}, x.options().dtype(at::kLong));
  if (dropout_p <= 0.0) rng_state.zero_();
  const DropoutParams drop = forward_dropout(dropout_p, rng_state, x);

  if (tokens > 0) {
    dispatch_lora_types(x.scalar_type(), lora_a.scalar_type(), kOp, [&](auto xt, auto at_) {
      using Tx = typename decltype(xt)::type;
      using Ta = typename decltype(at_)::type;
      launch_shrink<Tx, Ta>(x2, a, u, drop, stream);                   // u = drop(x)·Aᵀ
      if (out > 0) launch_expand<Tx, Ta>(u, b, bias_c, y2, scale, stream);  // y = bias + scale·u·Bᵀ
    });
    if (out > 0) y2.addmm_(x2, weight.t(), /*beta=*/1, /*alpha=*/1);  // y += x·Wᵀ (cuBLAS, beta = 1)
  }
  return {y2.view(with_last(x.sizes(), out)), u, rng_state};
}

at::Tensor lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p) {
  return std::get<0>(lora_linear_forward_cuda(x, weight, bias, lora_a, lora_b, scale, dropout_p));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& rng_state, double scale, double dropout_p,
    std::array<bool, 4> output_mask) {
  constexpr const char* op = "lorafuse.lora_linear_backward";
  detail::check_lora_linear_backward_args(op, grad_out, x, weight, lora_a, lora_b, u, rng_state, scale, dropout_p);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool need_x = output_mask[0], need_a = output_mask[1], need_b = output_mask[2], need_bias = output_mask[3];

  const int64_t in = x.size(-1), out = weight.size(0), r = lora_a.size(0);
  const at::Tensor x2 = rows_view(x);                                     // [T, in]
  const at::Tensor dy2 = grad_out.reshape({-1, out}).contiguous();        // [T, out]
  const int64_t tokens = x2.size(0);
  const at::Tensor a = lora_a.contiguous(), b = lora_b.contiguous(), uc = u.contiguous();
  const at::Tensor rng = rng_state.contiguous();
  const auto f32 = x.options().dtype(at::kFloat);

  at::Tensor grad_x = need_x ? at::empty({tokens, in}, x.options()) : at::empty({0}, x.options());
  at::Tensor grad_a = need_a ? at::empty({r, in}, lora_a.options()) : at::empty({0}, lora_a.options());
  at::Tensor grad_b = need_b ? at::empty({out, r}, lora_b.options()) : at::empty({0}, lora_b.options());
  at::Tensor grad_bias = need_bias ? at::empty({out}, x.options()) : at::empty({0}, x.options());
  auto finish = [&] {
    if (need_x) grad_x = grad_x.view(x.sizes());
    return std::make_tuple(grad_x, grad_a, grad_b, grad_bias);
  };
  if (tokens == 0) {  // nothing flows back: zero gradients for the parameters
    if (need_a) grad_a.zero_();
    if (need_b) grad_b.zero_();
    if (need_bias) grad_bias.zero_();
    return finish();
  }

  const bool need_v = need_x || need_a;
  const DropoutParams drop = backward_dropout(dropout_p, rng);

  dispatch_lora_types(x.scalar_type(), lora_a.scalar_type(), op, [&](auto xt, auto at_) {
    using Tx = typename decltype(xt)::type;
    using Ta = typename decltype(at_)::type;

    // ---- one pass over dY: v, dB, dbias ----
    at::Tensor v = need_v ? at::empty({tokens, r}, f32) : at::Tensor();
    if (need_v || need_b || need_bias) {
      const int64_t col_tiles = ceil_div<int64_t>(out, kGradOutCols);
      const int64_t tps = tokens_per_split(tokens, std::max<int64_t>(col_tiles, 1), kGradOutTokens);
      const int64_t splits = ceil_div<int64_t>(tokens, tps);
      at::Tensor v_part = need_v ? at::empty({col_tiles, tokens, r}, f32) : at::Tensor();
      at::Tensor db_part = need_b ? at::empty({splits, out, r}, f32) : at::Tensor();
      at::Tensor bias_part = need_bias ? at::empty({splits, out}, f32) : at::Tensor();
      if (col_tiles > 0) {
        for (int64_t r0 = 0; r0 < r; r0 += kMaxRankTile) {
          GradOutParams p{};
          p.dy = dy2.data_ptr();
          p.b = b.data_ptr();
          p.u = uc.const_data_ptr<float>();
          p.v_part = need_v ? v_part.data_ptr<float>() : nullptr;
          p.db_part = need_b ? db_part.data_ptr<float>() : nullptr;
          p.bias_part = (need_bias && r0 == 0) ? bias_part.data_ptr<float>() : nullptr;
          p.tokens = tokens;
          p.out = out;
          p.r = r;
          p.tokens_per_split = tps;
          p.r0 = static_cast<int>(r0);
          p.rc = static_cast<int>(std::min<int64_t>(kMaxRankTile, r - r0));
          LORAFUSE_RANK_TILE_SWITCH(p.rc, R, [&] {
            const auto kernel = lora_grad_out_kernel<Tx, Ta, R>;
            constexpr size_t smem = grad_out_smem_bytes<R>();
            C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                static_cast<int>(smem)));
            const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(splits));
            kernel<<<grid, kThreads, smem, stream>>>(p);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        }
      }
      if (need_v) launch_reduce_splits<float>(v_part, col_tiles, tokens * r, 1.f, v, stream);
      if (need_b) launch_reduce_splits<Ta>(db_part, splits, out * r, static_cast<float>(scale), grad_b, stream);
      if (need_bias) launch_reduce_splits<Tx>(bias_part, splits, out, 1.f, grad_bias, stream);
    }

    // ---- one pass over x: the LoRA part of dX, and dA ----
    if (need_v) {
      const int64_t col_tiles = ceil_div<int64_t>(in, kGradXCols);
      const int64_t tps = tokens_per_split(tokens, std::max<int64_t>(col_tiles, 1), kGradXTokens);
      const int64_t splits = ceil_div<int64_t>(tokens, tps);
      at::Tensor da_part = need_a ? at::empty({splits, r, in}, f32) : at::Tensor();
      if (col_tiles > 0) {
        for (int64_t r0 = 0; r0 < r; r0 += kMaxRankTile) {
          GradXParams p{};
          p.x = x2.data_ptr();
          p.ldx = x2.stride(0);
          p.a = a.data_ptr();
          p.v = v.const_data_ptr<float>();
          p.dx = need_x ? grad_x.data_ptr() : nullptr;
          p.da_part = need_a ? da_part.data_ptr<float>() : nullptr;
          p.tokens = tokens;
          p.in = in;
          p.r = r;
          p.tokens_per_split = tps;
          p.r0 = static_cast<int>(r0);
          p.rc = static_cast<int>(std::min<int64_t>(kMaxRankTile, r - r0));
          p.accumulate_dx = r0 > 0;
          p.scale = static_cast<float>(scale);
          p.drop = drop;
          LORAFUSE_RANK_TILE_SWITCH(p.rc, R, [&] {
            const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(splits));
            lora_grad_x_kernel<Tx, Ta, R><<<grid, kThreads, 0, stream>>>(p);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        }
      }
      if (need_a) launch_reduce_splits<Ta>(da_part, splits, r * in, static_cast<float>(scale), grad_a, stream);
    }
  });

  // dX += dY·W (cuBLAS, beta = 1 onto the LoRA part written above).
  if (need_x) grad_x.addmm_(dy2, weight, /*beta=*/1, /*alpha=*/1);
  return finish();
}

}  // namespace lorafuse::cuda

TORCH_LIBRARY_IMPL(lorafuse, CUDA, m) {
  m.impl("lora_linear", &lorafuse::cuda::lora_linear_cuda);
  m.impl("lora_linear_forward", &lorafuse::cuda::lora_linear_forward_cuda);
  m.impl("lora_linear_backward", &lorafuse::cuda::lora_linear_backward_cuda);
}
