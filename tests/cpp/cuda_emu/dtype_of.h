// The ATen dtype of a CUDA element type, for the emulated kernel tests.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace lorafuse_test {

template <typename T>
at::ScalarType dtype_of();
template <>
inline at::ScalarType dtype_of<float>() {
  return at::kFloat;
}
template <>
inline at::ScalarType dtype_of<__half>() {
  return at::kHalf;
}
template <>
inline at::ScalarType dtype_of<__nv_bfloat16>() {
  return at::kBFloat16;
}

}  // namespace lorafuse_test
