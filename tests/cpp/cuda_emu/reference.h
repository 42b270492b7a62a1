// float64 references shared by the emulated kernel tests: tolerances, relative error, the dropout's keep mask and
// its kernel parameters (the same Philox function the kernels and the CPU path use).
#pragma once

#include <ATen/ATen.h>
#include <cuda_fp16.h>  // the CUDA qualifiers (__device__ ...) for the host compiler

#include <cstdint>

#include "cuda/common/dropout.cuh"

namespace lorafuse_test {

inline double tol_of(at::ScalarType t) { return t == at::kFloat ? 2e-5 : (t == at::kHalf ? 4e-3 : 2e-2); }

// max |got - want| / (max |want| + 1e-6), in float64
inline double rel_err(const at::Tensor& got, const at::Tensor& want) {
  const auto w = want.to(at::kDouble);
  return (got.to(at::kDouble) - w).abs().max().item<double>() / (w.abs().max().item<double>() + 1e-6);
}

// mask[t, k] / (1 - p) of the dropout, from the same Philox function the kernels and the CPU path use.
inline at::Tensor keep_scale(int64_t tokens, int64_t in, double p, uint64_t seed, uint64_t offset) {
  auto m = at::ones({tokens, in}, at::kDouble);
  if (p == 0.0) return m;
  auto acc = m.accessor<double, 2>();
  const uint32_t thr = lorafuse::philox::keep_threshold(p);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t k = 0; k < in; ++k)
      acc[t][k] = lorafuse::philox::keep(seed, offset, static_cast<uint64_t>(t * in + k), thr) ? 1.0 / (1.0 - p) : 0.0;
  return m;
}

inline lorafuse::cuda::DropoutParams dropout(double p, uint64_t seed, uint64_t offset) {
  lorafuse::cuda::DropoutParams d;
  if (p == 0.0) return d;
  d.enabled = true;
  d.threshold = lorafuse::philox::keep_threshold(p);
  d.inv_keep = static_cast<float>(1.0 / (1.0 - p));
  d.seed = seed;
  d.offset = offset;
  return d;
}

}  // namespace lorafuse_test
