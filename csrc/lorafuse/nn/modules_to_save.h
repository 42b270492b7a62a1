// lorafuse::nn::ModulesToSave — a module that trains whole with an adapter (PEFT's modules_to_save, e.g. a task
// head): the original, frozen, and one trainable copy per adapter, the active adapter's copy running.
#pragma once

#include <lorafuse/config/adapter_options.h>
#include <lorafuse/nn/adapter_table.h>
#include <lorafuse/nn/linear.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace lorafuse::nn {

/// PEFT's ModulesToSaveWrapper, with its names: `original_module` (the model's module, frozen) and
/// `modules_to_save.<adapter>` (a copy per adapter, made when the adapter is added; the active adapter's copy trains).
/// forward runs the copy of the adapter that a LoRA layer would run (the active one, or an AdapterScope's; a mixed
/// batch runs each row's copy), and the original where there is none: disabled adapters, no active adapter, an adapter
/// without a copy here, "__base__" rows. The module must be one lorafuse can call (a base kind: torch::nn::Linear,
/// Embedding) and is held where its owner calls it through a LinearSlot (or a ModuleDict). A 4-bit base is refused: its
/// copy could not train.
class ModulesToSaveImpl : public torch::nn::Cloneable<ModulesToSaveImpl>, public SlotModule {
 public:
  /// Wraps `original` (frozen; not copied) with a copy for adapter `adapter_name` (`options` are the adapter's LoRA
  /// options, kept for its table), active unless `activate` is false.
  ModulesToSaveImpl(std::shared_ptr<torch::nn::Module> original, const std::string& adapter_name,
                    const LoraAdapterOptions& options, bool activate = true);

  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  std::shared_ptr<torch::nn::Module> clone(const std::optional<torch::Device>& device = std::nullopt) const override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

  at::Tensor forward(const at::Tensor& x);

  /// A copy of the original for adapter `name` (frozen unless it becomes the active one).
  void add_adapter(const std::string& name, const LoraAdapterOptions& options, bool activate = true);
  void set_adapter(const std::string& name);
  void clear_active_adapter();
  void delete_adapter(const std::string& name);
  /// The original from now on; every copy frozen until enable_adapters or set_adapter (PEFT's behaviour).
  void disable_adapters();
  void enable_adapters();
  const AdapterTable& adapters() const noexcept { return table_; }
  /// Adapter `name`'s copy (a ValueError naming the adapters there are when it has none).
  std::shared_ptr<torch::nn::Module> module_for(const std::string& name) const;
  /// What merge_and_unload and unload put in this layer's place: the active adapter's copy, or the original when
  /// none is active (PEFT).
  std::shared_ptr<torch::nn::Module> unloaded() const;

  at::Tensor slot_forward(const at::Tensor& x) override { return forward(x); }
  std::shared_ptr<torch::nn::Module> shallow_copy() const override;

  std::shared_ptr<torch::nn::Module> original_module;
  torch::nn::ModuleDict modules_to_save{nullptr};

 private:
  at::Tensor run(const std::string& name, const at::Tensor& x);
  void apply_trainability();

  std::shared_ptr<torch::nn::Module> pending_;  // the original, consumed by the constructor's reset()
  AdapterTable table_;
};

TORCH_MODULE(ModulesToSave);

/// A ValueError naming `path` unless `module` can be kept whole by a ModulesToSave (a module lorafuse can call and
/// copy: a full-precision torch::nn::Linear or Embedding; not a LoRA layer).
void check_saved_module(const torch::nn::Module& module, const std::string& path);

/// `module` as a modules-to-save layer, or nullptr.
ModulesToSaveImpl* as_saved_module(torch::nn::Module* module);

}  // namespace lorafuse::nn
