// Linear layers that LoRA injection can swap, and a factory for torch::nn::Linear on any device.
#pragma once

#include <c10/core/TensorOptions.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>

#include <functional>
#include <memory>
#include <string>

namespace lorafuse::nn {

/// A torch::nn::Linear whose weight [out, in] and bias [out] are made directly with `options`
/// (device, dtype) and initialised as torch::nn::Linear does — on the meta device they are only
/// shaped, so a skeleton of any size costs no memory.
torch::nn::Linear make_linear(int64_t in_features, int64_t out_features, bool bias,
                              const c10::TensorOptions& options = {});

/// Replaces the tensor registered as parameter `name` of `module` (the registry entry, not a copy);
/// the caller updates its own member handle. Used to build modules on devices that LibTorch's
/// constructors cannot allocate on (meta).
void replace_parameter(torch::nn::Module& module, const std::string& name, const at::Tensor& tensor);

/// Sets requires_grad of every parameter of `to` as the parameter of the same name in `from` has it.
/// Cloneable::clone re-creates parameters through reset(), which knows nothing of which ones a LoRA
/// model froze; the clone() of lorafuse modules calls this so that a clone trains what the original trains.
void copy_requires_grad(const torch::nn::Module& from, torch::nn::Module& to);

/// Throws a ValueError if `module` has parameters on the meta device: LibTorch's Linear::clone re-creates
/// its weights on the CPU and cannot take meta data back, so a meta skeleton is rebuilt from its
/// config instead of cloned.
void check_cloneable(const torch::nn::Module& module, const char* what);

/// A module that a LinearSlot holds besides LoRA layers and bases (a modules-to-save layer): how to call it and how
/// to copy it for a cloned owner.
class SlotModule {
 public:
  virtual ~SlotModule() = default;
  virtual at::Tensor slot_forward(const at::Tensor& x) = 0;
  /// A same-structure module sharing its tensors (the placeholder that Cloneable::clone then overwrites).
  virtual std::shared_ptr<torch::nn::Module> shallow_copy() const = 0;
};

/// A linear-layer child that inject_lora and merge_and_unload may swap between torch::nn::Linear and
/// lorafuse::nn::LoraLinear. LibTorch calls a child through the typed holder its owner keeps, and
/// replacing the registered child does not change that holder. A module that keeps its linear layers
/// in LinearSlots (and implements LinearSlotOwner) always calls the layer that is registered now.
///
///   struct BlockImpl : torch::nn::Cloneable<BlockImpl>, lorafuse::nn::LinearSlotOwner {
///     void reset() override { proj.reset(*this, "proj", torch::nn::LinearOptions(64, 64)); }
///     lorafuse::nn::LinearSlot* linear_slot(const std::string& n) override { return n == "proj" ? &proj : nullptr; }
///     torch::Tensor forward(const torch::Tensor& x) { return proj(x); }
///     lorafuse::nn::LinearSlot proj;
///   };
class LinearSlot {
 public:
  /// Registers child `name` of `owner` and binds the slot to it. A fresh slot gets a new Linear made by
  /// make_linear(options, tensor_options); a bound slot (an owner being cloned: its copy still points at
  /// the original's layer) gets a new, same-kind layer of the same structure, whose values
  /// Cloneable::clone then copies.
  void reset(torch::nn::Module& owner, const std::string& name, const torch::nn::LinearOptions& options,
             const c10::TensorOptions& tensor_options = {});
  /// Points the slot at `layer` once the owner's child was replaced: a LoRA layer (nn::LoraLayer), a base
  /// that nn::base_kinds() takes, or a SlotModule (a modules-to-save layer). Anything else is an error.
  void rebind(std::shared_ptr<torch::nn::Module> layer);
  /// Calls the bound layer.
  at::Tensor operator()(const at::Tensor& x) const;
  /// The bound layer, or nullptr.
  const std::shared_ptr<torch::nn::Module>& module() const noexcept { return module_; }

 private:
  std::shared_ptr<torch::nn::Module> module_;
  std::function<at::Tensor(const at::Tensor&)> call_;
};

/// Implemented by modules whose forward calls linear children through LinearSlots: inject_lora and
/// merge_and_unload replace such a child in the owner's registry and rebind its slot.
class LinearSlotOwner {
 public:
  virtual ~LinearSlotOwner() = default;
  /// The slot that holds child `name`, or nullptr when that child is not called through a slot.
  virtual LinearSlot* linear_slot(const std::string& name) = 0;
};

/// Whether child `name` of `parent` can be swapped so that the parent's forward calls the new module: the parent
/// keeps it in a LinearSlot (LinearSlotOwner) or is a torch::nn::ModuleDict.
bool can_replace_child(torch::nn::Module& parent, const std::string& name);
/// Puts `replacement` in place of child `name` of `parent`, in the registry and in what its forward calls; false
/// (nothing changed) when can_replace_child says no.
bool replace_child(torch::nn::Module& parent, const std::string& name, std::shared_ptr<torch::nn::Module> replacement);
/// The error for a child at `path` that cannot be replaced; `what` names the caller.
std::string cannot_replace_message(const torch::nn::Module& parent, const std::string& path, const char* what);

}  // namespace lorafuse::nn
