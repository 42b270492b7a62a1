// lorafuse::nn::LoraLayer — what every LoRA layer offers, whatever its base kind: named adapters, which one is
// active, merging. The model-wide functions (csrc/peft) work through this interface only, so a new base kind
// (a 4-bit base, an embedding) brings its layer and nothing in csrc/peft changes.
#pragma once

#include <ATen/core/Tensor.h>
#include <lorafuse/config/adapter_options.h>
#include <lorafuse/nn/adapter_table.h>
#include <torch/nn/module.h>

#include <memory>
#include <string>
#include <vector>

namespace lorafuse::nn {

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

  /// Folds the named adapters (default: the active one) into the base (lorafuse::lora_merge); an error for a
  /// base kind that cannot hold a merged weight.
  virtual void merge(const std::vector<std::string>& adapter_names = {}) = 0;
  /// Restores the unmerged base exactly.
  virtual void unmerge() = 0;
  /// Merges the active adapter for good and returns the base module that then replaces this layer.
  virtual std::shared_ptr<torch::nn::Module> unload_merged() = 0;
  /// A copy sharing this layer's tensors (no allocation): the placeholder a cloned owner's reset() registers
  /// before Cloneable::clone puts the real clone in its place.
  virtual std::shared_ptr<torch::nn::Module> shallow_copy() const = 0;
};

/// The LoRA layer that `module` is, or nullptr (the one place that asks).
LoraLayer* as_lora_layer(torch::nn::Module* module);
const LoraLayer* as_lora_layer(const torch::nn::Module* module);

}  // namespace lorafuse::nn
