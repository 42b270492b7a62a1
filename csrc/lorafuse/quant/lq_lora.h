// lorafuse::lq_plan — LQ-LoRA over a set of weight matrices: the cost table (each matrix decomposed as Q + L1·L2 under
// every candidate configuration), the bit allocation within the budget, and each matrix's chosen decomposition; the
// numerics that lorafuse::lq_lora (C++ modules) and lorafuse.lq_lora (Python models) share.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <lorafuse/config/lq_lora_config.h>
#include <lorafuse/ops/nf.h>
#include <lorafuse/quant/bit_allocation.h>

namespace lorafuse {

/// One weight matrix to plan: its name (a module path), the weight [out, in] and, optionally, its diagonal empirical
/// Fisher [out, in] (undefined: none).
struct LqMatrix {
  std::string name;
  at::Tensor weight;
  at::Tensor fisher;
};

/// What LQ-LoRA chose for one matrix and its decomposition W ≈ Q + L1·L2.
struct LqMatrixPlan {
  std::string name;
  int64_t out_features = 0, in_features = 0;
  /// The chosen configuration and its index in config.configs().
  QuantChoice config;
  int64_t config_index = 0;
  /// Bits per weight of Q (the configuration's).
  double bits = 0.0;
  /// ‖W − (Q + L1·L2)‖_F (Fisher-weighted when a Fisher was given) and that over ‖W‖_F (‖√F ⊙ W‖_F).
  double error = 0.0, relative_error = 0.0;
  /// Iterations run and the 1-based one kept.
  int64_t iterations = 0, best_iteration = 0;
  /// L1 [out, r], L2 [r, in] (float32) and Q.
  at::Tensor l1, l2;
  NfWeight q;
};

struct LqPlan {
  std::vector<LqMatrixPlan> matrices;
  /// The cost table with a budget (matrices × configurations): squared decomposition errors and storage in bits
  /// (bits per weight × numel); empty for uniform quantization.
  std::vector<std::vector<double>> cost, storage;
  /// The allocation's result with a budget (its gap is 0 when optimal).
  std::optional<BitAllocation> allocation;
  /// Average bits per weight over the matrices: of Q alone, and with the float32 LoRA factors (r·(out + in) each).
  double average_bits = 0.0, average_bits_with_lora = 0.0;
  /// Whether the cost table came from config.cache_path().
  bool from_cache = false;
};

/// Progress: stage ("cost": one matrix × configuration decomposed; "decompose": one matrix's chosen decomposition),
/// done, total.
using LqProgress = std::function<void(const std::string& stage, int64_t done, int64_t total)>;

/// LQ-LoRA's plan for `matrices` (distinct names; float32/bfloat16/float16 weights of rank > config.r()): with a
/// budget, every matrix is decomposed under every configuration (lq_decompose; the cost is the squared error), the
/// configurations are allocated by lorafuse::allocate_bits so that Σ storage <= budget_bits · Σ numel with the least
/// Σ cost, and each matrix is decomposed again under its choice (the same bits: the decomposition is seeded); without
/// a budget the one configuration is used for all. Matrices are decomposed one after another, each decomposition
/// using the machine's threads through ATen.
///
/// ValueError naming the argument: an invalid config, no matrices, a repeated name, a matrix that is not 2-D or whose
/// rank bound min(out, in) is <= r, a Fisher of another shape, a budget below what the smallest configurations take
/// or above what the largest take (both printed), a cache file that is not a cost table.
LqPlan lq_plan(const std::vector<LqMatrix>& matrices, const LqLoraConfig& config, const LqProgress& progress = {});

}  // namespace lorafuse
