// Putting LoRA into a model and working with its adapters, model-wide: PEFT's LoraModel in LibTorch.
#pragma once

#include <lorafuse/config/lora_config.h>
#include <lorafuse/nn/lora_linear.h>
#include <lorafuse/nn/modules_to_save.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <iosfwd>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace lorafuse {

/// What inject_lora did.
struct InjectReport {
  std::string adapter_name;
  /// Paths of the layers that got the adapter, in module order.
  std::vector<std::string> targets;
  /// Of those, the ones that were plain Linear layers and are LoraLinear layers now.
  std::vector<std::string> wrapped;
  /// Paths of the modules that train whole with the adapter (modules_to_save; ModulesToSave layers now).
  std::vector<std::string> saved;
  /// Parameters that require grad, and all parameters, after injection.
  int64_t trainable = 0;
  int64_t total = 0;
};

/// Walks `module`'s tree and gives adapter `adapter_name` to every Linear layer that `config` selects:
/// a torch::nn::Linear is replaced in place by a LoraLinear wrapping it (sharing its weight); a layer
/// that is a LoraLinear already gets the adapter beside its others. Then every parameter of the model
/// is frozen except the active adapter's A and B (and the biases that config.bias names).
///
/// The model's active adapter does not change: the first adapter injected becomes active; a later one
/// waits for set_adapter. Nothing is changed when an error is raised: a bad config, an adapter name
/// already present, targets that match no module (the message lists the Linear layers that exist; one list
/// entry matching nothing while others match is a warning), no target_modules for a model without default
/// targets, a selected module that is not a Linear, or a Linear whose parent calls it through a typed
/// holder that cannot be rewired (keep such layers in a lorafuse::nn::LinearSlot or a
/// torch::nn::ModuleDict).
///
/// `autocast_adapter_dtype` (PEFT's argument): true keeps a float16/bfloat16 base's adapters in float32 (stable
/// training); false makes them in the base's dtype.
///
/// config.saved_modules() (modules_to_save, and the heads of task_type SEQ_CLS/TOKEN_CLS/QUESTION_ANS): each module
/// select_saved_modules picks is wrapped in a nn::ModulesToSave (original frozen, a trainable copy for the adapter), or
/// gets its copy in the ModulesToSave there; LoRA leaves the layers inside it out. The copy trains while the adapter
/// is active, is saved with it (save_adapter), and replaces the module on merge_and_unload/unload.
InjectReport inject_lora(torch::nn::Module& module, const LoraConfig& config,
                         const std::string& adapter_name = "default", bool autocast_adapter_dtype = true);

/// Parameter counts (shared tensors counted once).
struct ParameterCount {
  int64_t trainable = 0;
  int64_t total = 0;
  /// 100 · trainable / total (0 for an empty model).
  double percent() const;
  /// PEFT's line: "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622".
  std::string str() const;
};
/// Parameters counted once each; a lorafuse::nn::Linear4bit's weight counts out × in (as lorafuse.trainable_parameters
/// and PEFT count 4-bit weights).
ParameterCount trainable_parameters(const torch::nn::Module& module);
/// Writes trainable_parameters(module).str() and a newline.
void print_trainable_parameters(const torch::nn::Module& module, std::ostream& out);
void print_trainable_parameters(const torch::nn::Module& module);

/// Every LoRA layer in the tree (whatever its base kind), with its path, in module order.
std::vector<std::pair<std::string, nn::LoraLayer*>> lora_layers(torch::nn::Module& module);

/// Every modules-to-save layer in the tree (modules_to_save), with its path, in module order.
std::vector<std::pair<std::string, nn::ModulesToSaveImpl*>> saved_modules(torch::nn::Module& module);

/// Adapter names present in the model, in the order they first appear.
std::vector<std::string> adapter_names(torch::nn::Module& module);
/// The model's active adapter ("" when none).
std::string active_adapter(torch::nn::Module& module);
/// Another adapter beside the existing ones (inject_lora under another name).
InjectReport add_adapter(torch::nn::Module& module, const std::string& adapter_name, const LoraConfig& config,
                         bool autocast_adapter_dtype = true);
/// Activates `adapter_name` in every layer that has it (the others run as their base) and makes only
/// its weights trainable. Moves no data. An error if no layer has it.
void set_adapter(torch::nn::Module& module, const std::string& adapter_name);
/// The base model alone (merged layers are unmerged first; every adapter frozen, as PEFT) / the adapters again (the
/// active one trains).
void disable_adapters(torch::nn::Module& module);
void enable_adapters(torch::nn::Module& module);
/// Removes `adapter_name` from every layer; layers left without adapters stay LoraLinear layers.
void delete_adapter(torch::nn::Module& module, const std::string& adapter_name);
/// Folds the named adapters (default: the active one) into the base weights of every layer that has
/// them, all or nothing: if one layer fails (non-finite weights), the layers before it are put back. Layers that have
/// an adapter merged already keep it as it is, with a warning (TORCH_WARN; PEFT's behaviour).
/// 4-bit layers refuse (rounding to 4 bits again changes their outputs) unless `requantize`; the result
/// maps the path of every layer holding a re-quantized merge (this call's or an earlier one's) to what the
/// rounding cost (empty when nothing is rounded).
/// unmerge_adapter restores every layer's weights (and 4-bit bytes) exactly.
std::map<std::string, nn::MergeError> merge_adapter(torch::nn::Module& module,
                                                    const std::vector<std::string>& adapter_names = {},
                                                    bool requantize = false);
void unmerge_adapter(torch::nn::Module& module);
/// Merges the active adapter for good (also while adapters are disabled, as PEFT does) and puts each
/// layer's plain torch::nn::Linear back in place of its LoRA layer: the model is the base model again,
/// with the adapter inside its weights; a 4-bit layer becomes a dense Linear (compute dtype) holding
/// dequant(W) + the adapter. Nothing changes if a merge fails.
void merge_and_unload(torch::nn::Module& module);

/// Puts every LoRA layer's base back in its place, adapters dropped (PEFT's unload()): not merged — what a merge
/// folded into a base stays there (as in PEFT). Save adapters first (save_adapter) to keep them. Every layer must sit
/// where it can be swapped (checked before any is). A modules-to-save layer gives its active adapter's copy (the
/// original when none is active), as merge_and_unload and PEFT do. Returns the paths unloaded.
std::vector<std::string> unload(torch::nn::Module& module);

}  // namespace lorafuse
