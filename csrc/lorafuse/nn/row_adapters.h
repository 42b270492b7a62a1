// lorafuse::nn::RowAdapters — the per-row routing of a mixed batch (an AdapterScope, or Python's use_adapter, with one
// adapter name per row): the rules every LoRA layer (C++ and Python) follows for it, and what the layers of one
// forward share (the rows grouped by adapter, computed once per distinct layer situation, not once per layer).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <lorafuse/nn/adapter_table.h>
#include <lorafuse/ops/lora_multi.h>

#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace lorafuse::nn {

class RowAdapters {
 public:
  /// One adapter name per row of the batch ("" or "__base__": the base alone for that row). A ValueError (every
  /// offending name listed) for an empty list, invalid names, or names that no LoRA layer in this process holds.
  /// `what` prefixes the errors ("use_adapter", "AdapterScope").
  RowAdapters(std::vector<std::string> names, const std::string& what);

  const std::vector<std::string>& names() const noexcept { return names_; }
  static bool is_base(const std::string& name) { return name.empty() || name == "__base__"; }

  /// What one layer runs for a batch.
  struct Plan {
    std::vector<std::string> adapters;  // the layer's adapters that rows use, first-appearance order (empty: base)
    LoraSegments segments;              // the batch's token rows grouped by those adapters (unset when uniform)
    bool uniform = false;               // every row runs adapters[0]: the plain single-adapter path
  };
  /// The plan of a layer whose table is `table` and whose routes hold `available` (the adapters it can run now), for
  /// an input x of shape `x_sizes` on `device`: its rows are its first dimension (a 1-D x is one row), each of
  /// numel / rows / in tokens; generate repeats each named row for beams, so the rows must be a multiple of the
  /// names. Errors: a merged layer, rows not a multiple. Rows of adapters the layer lacks run its base. Cached:
  /// layers in the same situation share one computation.
  Plan plan(const AdapterTable& table, const std::vector<std::string>& available, c10::IntArrayRef x_sizes,
            const c10::Device& device) const;

  /// A batch of `rows` rows (a multiple of the names; generate repeats each named row), grouped by the name each row
  /// runs, in first-appearance order: (name, row indices), the base's rows under "" (for "" and "__base__") and under
  /// each name not in `available` (the adapters a layer holds), merged into one "" group. What layers that run a whole
  /// module per adapter (modules_to_save) compute a mixed batch with.
  std::vector<std::pair<std::string, std::vector<int64_t>>> row_groups(int64_t rows,
                                                                       const std::vector<std::string>& available) const;

  /// The dropout probability of a mixed batch over adapters with `dropouts` (0 unless training): training needs
  /// one value for all of them (a ValueError naming them otherwise).
  double dropout(const std::vector<std::string>& adapters, const std::vector<double>& dropouts, bool training) const;

 private:
  std::vector<std::string> names_;
  mutable std::mutex mutex_;
  mutable std::unordered_map<std::string, Plan> cache_;
};

}  // namespace lorafuse::nn
