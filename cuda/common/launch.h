// Host-side launch helpers: dtype tags for dispatch and the launch check.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

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

}  // namespace lorafuse::cuda
