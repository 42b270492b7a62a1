// How LQ-LoRA quantizes a model's weight matrices (lorafuse::lq_plan, lorafuse::lq_lora): the candidate quantization
// configurations, the bit budget, the rank and the decomposition's settings.
#pragma once

#include <c10/core/ScalarType.h>
#include <torch/arg.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace lorafuse {

/// One quantization configuration: a format [bits, blocksize, stat_bits, stat_blocksize] (lorafuse/ops/nf.h) and the
/// dtype of its statistic scales.
struct QuantChoice {
  std::vector<int64_t> format;
  c10::ScalarType stat_dtype = c10::ScalarType::Float;
  /// Bits per weight (the one offset per matrix left out).
  double bits_per_weight() const;
  /// "nf3-b64-s8x256-fp32" (stat_bits 0: "nf3-b64").
  std::string name() const;
  bool operator==(const QuantChoice& other) const { return format == other.format && stat_dtype == other.stat_dtype; }
};

/// The configurations LQ-LoRA chooses from by default: NF-b with b in {2, 3, 4, 8} and first-level blocks of 16, 32
/// and 64, the statistics in bitsandbytes' 8-bit double quantization (blocks of 256, float32 scales): 12 choices from
/// 2.127 to 8.508 bits per weight. The grid of the paper (432 choices) is lq_paper_grid().
std::vector<QuantChoice> lq_default_grid();
/// The LQ-LoRA paper's grid: b in {2, 3, 4, 8}, B0 in {16, 32, 64}, b0 in {2, 3, 4, 8}, B1 in {16, 64, 256},
/// scales in {float32, float16, bfloat16}.
std::vector<QuantChoice> lq_paper_grid();

struct LqLoraConfig {
  /// ValueError naming the field unless the config is valid.
  void validate() const;

  /// Average bits per weight over the targeted matrices (the LoRA factors not counted); nullopt: `configs` holds one
  /// configuration, used for every matrix (uniform quantization, e.g. NF3).
  TORCH_ARG(std::optional<double>, budget_bits) = 2.75;
  /// Rank of L1·L2 (the LoRA adapter's r).
  TORCH_ARG(int64_t, r) = 64;
  /// The adapter's lora_alpha: scale s = lora_alpha / r; lora_A = L2/√s, lora_B = L1/√s so that s·B·A = L1·L2.
  TORCH_ARG(double, lora_alpha) = 16.0;
  /// The candidates (non-empty, no duplicates).
  TORCH_ARG(std::vector<QuantChoice>, configs) = lq_default_grid();
  /// The decomposition's settings (lorafuse::LqDecomposeOptions).
  TORCH_ARG(int64_t, max_iters) = 20;
  TORCH_ARG(double, tol) = 1e-3;
  TORCH_ARG(int64_t, oversampling) = 10;
  TORCH_ARG(int64_t, power_iters) = 2;
  TORCH_ARG(uint64_t, seed) = 0;
  /// A JSON file caching the cost table (errors and storage of every matrix × configuration), keyed by the weights'
  /// checksums, shapes, Fisher and every setting above but the budget: a second budget costs only the allocation.
  /// Empty: no cache.
  TORCH_ARG(std::string, cache_path) = "";
  /// Matrices decomposed at once (the cost table's and the chosen configurations' decompositions): 0, as many as
  /// ATen's intra-op threads (at::get_num_threads()); 1, one after another, each with every thread for its own ops.
  /// At most ATen's thread count take effect. It changes no result beyond the last bits of a float sum (the ops of a
  /// matrix run on one thread instead of several) and is not part of the cache key.
  TORCH_ARG(int64_t, threads) = 0;
};

}  // namespace lorafuse
