// lorafuse::nn::LoraLayer — what every LoRA layer offers, whatever its base kind: named adapters, which one is
// active, merging. The model-wide functions (csrc/peft) work through this interface only, so a new base kind
// (a 4-bit base, an embedding) brings its layer and nothing in csrc/peft changes.
#pragma once

#include <ATen/core/Tensor.h>
#include <lorafuse/config/adapter_options.h>
#include <lorafuse/nn/adapter_table.h>
#include <torch/nn/module.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace lorafuse::nn {

/// What merging into a quantized base cost (lorafuse::nf4_merge): the relative output change for inputs with
/// uncorrelated features, ‖Ŵ − W'‖/‖W'‖, and the rounding against what the adapters add, ‖Ŵ − W'‖/‖W' − W‖.
struct MergeError {
  double output_error = 0.0;
  double adapter_error = 0.0;
};

class LoraLayer {
 public:
  virtual ~LoraLayer() = default;
  /// The layer as a module (its registry, train/eval mode, parameters).
  virtual torch::nn::Module& module() = 0;
  /// The layer's forward (LinearSlot calls it).
  virtual at::Tensor lora_forward(const at::Tensor& x) = 0;
  virtual int64_t in_features() const = 0;
  virtual int64_t out_features() const = 0;
  /// The base layer's bias, or an undefined tensor (PEFT's bias modes train it).
  virtual at::Tensor base_bias() const = 0;

  /// The layer's adapters and the rules over them (names, options, active, enabled, merged).
  virtual const AdapterTable& adapters() const noexcept = 0;

  /// Adds adapter `name`; with `activate` false it never becomes the active one.
  virtual void add_adapter(const std::string& name, const LoraAdapterOptions& options, bool activate) = 0;
  virtual void set_adapter(const std::string& name) = 0;
  virtual void clear_active_adapter() = 0;
  virtual void delete_adapter(const std::string& name) = 0;
  virtual void disable_adapters() = 0;
  virtual void enable_adapters() = 0;
  /// lora_A.<name>.weight [r, in] and lora_B.<name>.weight [out, r].
  virtual at::Tensor& lora_a(const std::string& name) = 0;
  virtual at::Tensor& lora_b(const std::string& name) = 0;
  /// A DoRA adapter's magnitude vector, lora_magnitude_vector.<name>.weight [out] (ValueError for other adapters).
  virtual at::Tensor& lora_magnitude(const std::string& name) = 0;

  // What the table says, for short.
  bool adapters_enabled() const noexcept { return adapters().enabled(); }
  /// "" when none is active.
  const std::string& active_adapter() const noexcept { return adapters().active(); }
  /// Adapter names in the order they were added.
  const std::vector<std::string>& adapter_names() const noexcept { return adapters().names(); }
  bool has_adapter(const std::string& name) const { return adapters().has(name); }
  const LoraAdapterOptions& adapter_options(const std::string& name) const {
    return adapters().options(name, "adapter_options");
  }
  bool merged() const noexcept { return !adapters().merged().empty(); }
  const std::vector<std::string>& merged_adapters() const noexcept { return adapters().merged(); }

  /// Folds the named adapters (default: the active one) into the base (lorafuse::lora_merge). A 4-bit base holds
  /// the merged weight only by rounding it to 4 bits again: it refuses unless `requantize` (then merge_error()
  /// says what the rounding cost; unmerge() still restores the old bytes exactly). Bases merged in place ignore
  /// `requantize`.
  virtual void merge(const std::vector<std::string>& adapter_names = {}, bool requantize = false) = 0;
  /// What re-quantizing the current merge cost, or nullopt (nothing merged, or merged without rounding to 4 bits).
  virtual std::optional<MergeError> merge_error() const { return std::nullopt; }
  /// Restores the unmerged base exactly.
  virtual void unmerge() = 0;
  /// Merges the active adapter for good and returns the base module that then replaces this layer.
  virtual std::shared_ptr<torch::nn::Module> unload_merged() = 0;
  /// The base module as it is (adapters merged into it stay merged): what unload puts back in this layer's place.
  virtual std::shared_ptr<torch::nn::Module> base_module() const = 0;
  /// For a base not merged in place (4-bit): the dense module merge_and_unload gives (dequantized W + the active
  /// adapter), computed without changing this layer; nullptr for bases merged in place.
  virtual std::shared_ptr<torch::nn::Module> unloaded_dense() const { return nullptr; }
  /// A copy sharing this layer's tensors (no allocation): the placeholder a cloned owner's reset() registers
  /// before Cloneable::clone puts the real clone in its place.
  virtual std::shared_ptr<torch::nn::Module> shallow_copy() const = 0;
};

/// The LoRA layer that `module` is, or nullptr (the one place that asks).
LoraLayer* as_lora_layer(torch::nn::Module* module);
const LoraLayer* as_lora_layer(const torch::nn::Module* module);

}  // namespace lorafuse::nn
