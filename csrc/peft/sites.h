// The model tree as inject_lora, the adapter functions and the adapter loader walk it (private to csrc/peft).
#pragma once

#include <lorafuse/config/lora_config.h>
#include <lorafuse/nn/lora_layer.h>
#include <lorafuse/nn/modules_to_save.h>
#include <lorafuse/peft/inject.h>
#include <lorafuse/peft/rules.h>
#include <torch/nn/module.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace lorafuse::detail {

// A child of the tree: its parent, its name there, its path from the root.
struct Site {
  torch::nn::Module* parent;
  std::string name;
  std::string path;
  std::shared_ptr<torch::nn::Module> module;
};

// Pre-order, so module order; LoRA layers are leaves (their base and adapters are theirs).
std::vector<Site> sites_of(torch::nn::Module& module);
// What select_targets and plan_adapter_load see of each site (with Linear shapes).
std::vector<ModuleInfo> infos_of(const std::vector<Site>& sites);
bool is_linear(const torch::nn::Module* m);
// select_targets over the tree of `root` (its sites): the model type and output layer that `root` declares
// (nn::PretrainedModel) apply.
std::vector<TargetChoice> select_in(const torch::nn::Module& root, const std::vector<Site>& sites,
                                    const LoraConfig& config);
// autocast_adapter_dtype=false: each choice's adapter in its base's compute dtype (unless its options name one).
void keep_base_dtype(const std::vector<Site>& sites, std::vector<TargetChoice>& chosen);
// An error unless every chosen plain Linear can be replaced (see inject_lora).
void check_rewirable(const std::vector<Site>& sites, const std::vector<TargetChoice>& chosen, const char* what);
/// For every chosen site whose adapter starts with LoftQ: a full-precision Linear weight (a LoraLinear without merged
/// adapters, or a torch::nn::Linear) that nn::check_loftq_weight accepts; a ValueError naming the layer otherwise.
void check_loftq(const std::vector<Site>& sites, const std::vector<TargetChoice>& chosen);
/// For every chosen DoRA adapter: a dense Linear base (a LoraLinear or a torch::nn::Linear); a ValueError naming the
/// layer otherwise, before anything changes.
void check_dora(const std::vector<Site>& sites, const std::vector<TargetChoice>& chosen);

// Gives adapter `name` to sites[c.index] for each choice: adds it to a LoraLinear, or wraps a Linear in a
// new LoraLinear (in the model's train/eval mode; disabled if the model's adapters are). `fill` (if set)
// then sets each layer's weights. When `keep_active` is set, no layer activates the adapter (the model
// has another active one, and threads may be running forward). Returns the targets and the wrapped layers.
InjectReport attach_adapter(const std::vector<Site>& sites, const std::vector<TargetChoice>& chosen,
                            const std::string& name, bool keep_active,
                            const std::function<void(size_t, nn::LoraLayer&)>& fill = nullptr);

// For each module that modules_to_save keeps whole (indices into sites of `root`): a modules-to-save layer already, or
// a module lorafuse can wrap (nn::check_saved_module) where its parent lets it be replaced, holding no weights tied to
// a module outside it. Before anything changes.
void check_saved(const torch::nn::Module& root, const std::vector<Site>& sites, const std::vector<size_t>& saved,
                 const char* what);
// Gives adapter `name` its copy of each module in `saved`: added to a modules-to-save layer there, or a new one
// wrapping the module (in the model's mode; disabled if the model's adapters are); `keep_active` as attach_adapter.
// `fill` (if set) then sets the copy's state.
void attach_saved(const std::vector<Site>& sites, const std::vector<size_t>& saved, const LoraConfig& config,
                  const std::string& name, bool keep_active,
                  const std::function<void(size_t, nn::ModulesToSaveImpl&)>& fill = nullptr);

// inject_lora's last step: freeze everything but `active`'s A and B (and its biases by its bias mode).
void activate_and_freeze(torch::nn::Module& module, const std::string& active);

// The parameters of the biases that train with `adapter` (rules::trained_biases), with their names.
std::vector<std::pair<std::string, at::Tensor>> trained_bias_parameters(torch::nn::Module& module,
                                                                        const std::string& adapter);
// The layers' adapter tables, for the model-wide rules (lorafuse/peft/rules.h).
rules::LayerTables tables_of(const std::vector<std::pair<std::string, nn::LoraLayer*>>& layers);
std::string join(const std::vector<std::string>& names);

}  // namespace lorafuse::detail
