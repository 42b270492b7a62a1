// lorafuse::lq_decompose — LQ-LoRA's decomposition of one weight matrix: W ≈ Q + L1·L2, Q in a quantized-weight format
// (lorafuse/ops/nf.h), L1·L2 of rank r, found by alternating a randomized rank-r SVD of W − Q with quantizing
// W − L1·L2 (Guo et al., "LQ-LoRA", 2023), optionally weighted by a diagonal Fisher.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <torch/arg.h>

#include <cstdint>
#include <optional>
#include <vector>

#include <lorafuse/ops/nf.h>

namespace lorafuse {

struct LqDecomposeOptions {
  explicit LqDecomposeOptions(int64_t rank, std::vector<int64_t> format) : rank_(rank), format_(std::move(format)) {}
  /// r: the rank of L1·L2, 1 <= r < min(out, in).
  TORCH_ARG(int64_t, rank);
  /// The quantization format of Q, [bits, blocksize, stat_bits, stat_blocksize] (lorafuse/ops/nf.h).
  TORCH_ARG(std::vector<int64_t>, format);
  /// The dtype Q's statistic scales are stored in (float32, bfloat16 or float16).
  TORCH_ARG(at::ScalarType, stat_dtype) = at::kFloat;
  /// Alternations at most (each: one SVD, one quantization). >= 1.
  TORCH_ARG(int64_t, max_iters) = 20;
  /// Stop once an iteration lowers the best error by less than tol · that error (an increase stops too). >= 0.
  TORCH_ARG(double, tol) = 1e-3;
  /// Extra columns of the randomized SVD's sketch (the reference: 10) and its power iterations (torch.svd_lowrank's
  /// default: 2).
  TORCH_ARG(int64_t, oversampling) = 10;
  TORCH_ARG(int64_t, power_iters) = 2;
  /// Seed of the sketch's Gaussian matrix: the same inputs and seed give the same bits.
  TORCH_ARG(uint64_t, seed) = 0;
  /// The diagonal empirical Fisher of W [out, in] (sums of squared per-example gradients; finite, >= 0), or none.
  /// Given: the SVD is taken of D_r·(W − Q)·D_c with D_r = sqrt(row means), D_c = sqrt(column means) (each clamped
  /// below at 1e-12 of its largest, so a row or column that never saw a gradient still unscales), then unscaled;
  /// the error is ‖√F ⊙ (W − Q − L1·L2)‖_F. The quantization itself is not weighted.
  TORCH_ARG(std::optional<at::Tensor>, fisher) = std::nullopt;
};

struct LqDecomposition {
  /// L1 [out, r] and L2 [r, in] in float32, and Q, of the best iterate (the lowest error seen).
  at::Tensor l1, l2;
  NfWeight q;
  /// The best error: ‖W − (Q + L1·L2)‖_F, or its Fisher-weighted form.
  double error = 0.0;
  /// ‖W‖_F (Fisher-weighted: ‖√F ⊙ W‖_F), to make the error relative.
  double norm = 0.0;
  /// The error after each iteration (errors.size() iterations ran) and the 1-based iteration of the best.
  std::vector<double> errors;
  int64_t best_iteration = 0;
};

/// Decomposes `weight` [out, in] (float32, bfloat16 or float16; finite) as Q + L1·L2. From Q = 0: L1, L2 = the
/// rank-r randomized SVD of W − Q (sketch of r + oversampling columns, float32), split as U·√S and √S·Vᵀ; Q =
/// quantize(W − L1·L2); until the error stops improving by tol or max_iters. Deviation from the reference code,
/// which stops at the first increase and returns that worse iterate: the best iterate is kept, and a relative
/// tolerance ends the slow tail (the reference can take ~60 iterations at 3-4 bits).
///
/// c10::ValueError naming the argument: a weight that is not 2-D or has non-finite values, a rank out of range, a
/// format out of range, options out of range, a Fisher of another shape or with negative or non-finite values.
LqDecomposition lq_decompose(const at::Tensor& weight, const LqDecomposeOptions& options);

}  // namespace lorafuse
