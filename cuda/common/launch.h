// Host-side launch helpers of the CUDA backend: the launcher, dtype tags for dispatch, row views and the dropout
// parameters drawn from torch's CUDA generator.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <mutex>

#include "csrc/ops/common/lora_linear_checks.h"
#include "cuda/common/dropout.cuh"

namespace lorafuse::cuda {

template <typename T>
struct TypeTag {
  using type = T;
};

// The CUDA element type behind an ATen dtype (16-bit types share their layout with ATen's).
template <typename T>
T* device_ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

inline void check_cuda_dtype(const at::Tensor& x, const char* op) {
  const auto xt = x.scalar_type();
  TORCH_CHECK_TYPE(xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16, op,
                   ": CUDA kernels take x of dtype float32, float16 or bfloat16; found ", xt,
                   " (float64 is supported on CPU)");
}

// Calls f(TypeTag<Tx>{}, TypeTag<Ta>{}) for x's dtype Tx and the adapter's dtype Ta (Tx or float).
template <typename F>
void dispatch_lora_types(at::ScalarType xt, at::ScalarType at_, const char* op, F&& f) {
  const bool a_fp32 = at_ == at::kFloat;
  switch (xt) {
    case at::kFloat:
      return f(TypeTag<float>{}, TypeTag<float>{});
    case at::kHalf:
      return a_fp32 ? f(TypeTag<__half>{}, TypeTag<float>{}) : f(TypeTag<__half>{}, TypeTag<__half>{});
    case at::kBFloat16:
      return a_fp32 ? f(TypeTag<__nv_bfloat16>{}, TypeTag<float>{})
                    : f(TypeTag<__nv_bfloat16>{}, TypeTag<__nv_bfloat16>{});
    default:
      TORCH_CHECK_TYPE(false, op, ": no CUDA kernel for x of dtype ", xt);
  }
}

// Calls f(TypeTag<T>{}) for dtype float32, float16 or bfloat16 (of the argument `what`); other dtypes are refused
// naming it.
template <typename F>
void dispatch_float_types(at::ScalarType dtype, const char* op, F&& f, const char* what = "dtype") {
  switch (dtype) {
    case at::kFloat:
      return f(TypeTag<float>{});
    case at::kHalf:
      return f(TypeTag<__half>{});
    case at::kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
    default:
      TORCH_CHECK_TYPE(false, op, ": ", what, ": CUDA kernels take float32, float16 or bfloat16; found ", dtype,
                       " (float64 is supported on CPU)");
  }
}

// Launches a kernel on the current stream and checks the launch (the Launcher of lora_linear_launch.cuh).
struct CudaLauncher {
  cudaStream_t stream;
  template <typename P>
  void operator()(void (*kernel)(P), dim3 grid, unsigned threads, size_t smem, const P& params) const {
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    void* args[] = {const_cast<P*>(&params)};
    C10_CUDA_CHECK(cudaLaunchKernel(reinterpret_cast<const void*>(kernel), grid, dim3(threads), args, smem, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// x viewed as [T, in] with unit column stride (rows may be strided, e.g. a slice).
inline at::Tensor rows_view(const at::Tensor& x) {
  at::Tensor x2 = x.reshape({detail::leading_numel(x.sizes()), x.size(-1)});
  if (x2.stride(1) != 1 || (x2.size(0) > 1 && x2.stride(0) < x2.size(1))) x2 = x2.contiguous();
  return x2;
}

inline DropoutParams dropout_params(double p) {
  DropoutParams d;
  if (p <= 0.0) return d;
  d.enabled = true;
  d.threshold = philox::keep_threshold(p);
  d.inv_keep = static_cast<float>(1.0 / (1.0 - p));
  return d;
}

// Forward: (seed, offset) from torch's CUDA generator (graph-safe), recorded into rng_state by the kernel.
inline DropoutParams forward_dropout(double p, at::Tensor& rng_state, const at::Tensor& x) {
  DropoutParams d = dropout_params(p);
  if (!d.enabled) return d;
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      std::nullopt, at::cuda::detail::getDefaultCUDAGenerator(x.device().index()));
  at::PhiloxCudaState st;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    st = gen->philox_cuda_state(4);  // counters are (element / 4, offset): one offset step per call
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

}  // namespace lorafuse::cuda
