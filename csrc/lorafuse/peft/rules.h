// The model-wide adapter rules, over the adapter tables of a model's LoRA layers: which adapters the model has,
// which is active, what set_adapter, delete_adapter, merge and unmerge do to each layer, and what they refuse.
// C++ (csrc/peft/inject.cpp) and Python (lorafuse.peft) both plan with these and then act on their own layers,
// so the rules and their messages exist once. Each check runs before any layer changes.
#pragma once

#include <lorafuse/nn/adapter_table.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace lorafuse::rules {

/// (path, table) of each LoRA layer, in module order.
using LayerTables = std::vector<std::pair<std::string, const nn::AdapterTable*>>;

/// Adapter names present in the model, in the order they first appear.
std::vector<std::string> adapter_names(const LayerTables& layers);
/// The first layer's active adapter that has one, or "".
std::string active_adapter(const LayerTables& layers);
/// A ValueError "<what>: no layer has an adapter named ..." unless some layer has `name`.
void require_adapter(const LayerTables& layers, const std::string& name, const std::string& what);

/// A ValueError "adapter_name: the model already has an adapter named ..." (then `hint`) if some layer has `name`.
void check_new_adapter(const LayerTables& layers, const std::string& name, const std::string& hint = "");

/// set_adapter: per layer, the adapter it activates: `name`, or "" where the layer lacks it (clear_active_adapter:
/// it runs its base).
std::vector<std::string> plan_set_adapter(const LayerTables& layers, const std::string& name);
/// delete_adapter (checked: some layer has it, none has it merged): what the model activates afterwards —
/// nothing (std::nullopt) unless `name` was active; then the first remaining adapter, or "" when none remains.
std::optional<std::string> plan_delete_adapter(const LayerTables& layers, const std::string& name);
/// A model-wide merge of `names` (empty: the active adapter): per layer, the names it merges (empty: none).
/// Refused, naming `what` (the caller's function) and the layer: no active adapter, a repeated name, a name no
/// layer has, disabled adapters in a layer that would merge one of them. As PEFT, a layer that has an adapter merged
/// already keeps it as it is (no error): a warning (TORCH_WARN) names them, or says there is nothing to do.
std::vector<std::vector<std::string>> plan_merge(const LayerTables& layers, const std::vector<std::string>& names,
                                                 const std::string& what);
/// A ValueError "<what>: nothing is merged in this model" unless some layer is merged.
void check_unmerge(const LayerTables& layers, const std::string& what);
/// Whether a layer that a new adapter wraps starts disabled: the model has LoRA layers and all are disabled.
bool starts_disabled(const LayerTables& layers);
/// The `bias` mode that decides which biases train while `active` is active (its first layer's options; "none").
std::string bias_mode(const LayerTables& layers, const std::string& active);
/// The biases that train with `adapter` (PEFT's bias modes; they are saved with it), as names among
/// `parameter_names` (the model's named parameters): "all" every bias, "lora_only" the base biases of the layers that
/// have it ("<path>.base_layer.bias", however deep the base is nested: an attention's output projection is the layer
/// "<path>.base_layer.out_proj"), "none" none.
/// Biases inside the modules at `kept_whole` (modules_to_save layers) are never among them: their copies train whole
/// and their originals stay frozen.
std::vector<std::string> trained_biases(const LayerTables& layers, const std::vector<std::string>& parameter_names,
                                        const std::string& adapter, const std::vector<std::string>& kept_whole = {});
/// Where each bias of an adapter file goes: for each (name, shape) of `file_biases`, the model parameter among
/// `parameters` (name, shape) it is copied into — its own name, or the same bias before/after wrapping (the names
/// equal without their "base_layer" components: "<path>.bias" ⇔ "<path>.base_layer.bias", as PEFT since 0.7 names it,
/// and "attn.out_proj.bias" ⇔ "attn.base_layer.out_proj.base_layer.bias"). ValueErrors prefixed with `what`: a
/// bias the model lacks, a shape that differs.
std::vector<std::string> match_biases(const std::vector<std::pair<std::string, std::vector<int64_t>>>& file_biases,
                                      const std::vector<std::pair<std::string, std::vector<int64_t>>>& parameters,
                                      const std::string& what);

/// Merging writes into a layer's base weight in place: where another module holds the same tensor (tied weights, e.g.
/// an lm_head sharing the input embeddings'), that module would change too, silently. `parameters` are the model's
/// parameters as (full name, identity: equal for one tensor under several names); for each layer path in `merging`
/// (LoRA layers about to merge in place), a parameter inside it that also has a name outside it is a ValueError
/// prefixed with `what`, naming both; `consequence` says why that is refused (default: what a merge would do).
/// modules_to_save asks it too: a copy per adapter of a module holding tied weights would untie them.
void check_not_tied(const std::vector<std::pair<std::string, int64_t>>& parameters,
                    const std::vector<std::string>& merging, const std::string& what,
                    const std::string& consequence = "");

}  // namespace lorafuse::rules
