#include <c10/util/Exception.h>
#include <lorafuse/nn/base_kind.h>
#include <lorafuse/nn/linear.h>
#include <lorafuse/nn/linear4bit.h>
#include <lorafuse/nn/lora_attention.h>
#include <lorafuse/nn/lora_linear.h>
#include <lorafuse/nn/modules_to_save.h>
#include <lorafuse/nn/pretrained.h>
#include <lorafuse/peft/inject.h>
#include <lorafuse/peft/rules.h>
#include <torch/nn/modules/container/moduledict.h>

#include "csrc/peft/sites.h"

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <map>
#include <unordered_set>

namespace lorafuse {
namespace {

using detail::Site;
using nn::LoraLayer;
using torch::nn::Module;

// rules::check_not_tied over this model's parameters (identity: the tensor's storage object).
void check_not_tied(const Module& model, const std::vector<std::string>& paths, const char* what,
                    const std::string& consequence = "") {
  if (paths.empty()) return;
  std::vector<std::pair<std::string, int64_t>> parameters;
  for (const auto& p : model.named_parameters(/*recurse=*/true)) {
    parameters.emplace_back(p.key(), reinterpret_cast<int64_t>(p.value().unsafeGetTensorImpl()));
  }
  rules::check_not_tied(parameters, paths, what, consequence);
}

void check_not_tied(const Module& model, const std::vector<std::pair<std::string, LoraLayer*>>& layers,
                    const char* what) {
  std::vector<std::string> merging;
  for (const auto& [path, layer] : layers) merging.push_back(path);
  check_not_tied(model, merging, what);
}

void walk(Module& module, const std::string& prefix, std::vector<Site>& out) {
  for (const auto& child : module.named_children()) {
    std::string path = prefix.empty() ? child.key() : prefix + "." + child.key();
    out.push_back({&module, child.key(), path, child.value()});
    // LoRA and modules-to-save layers are leaves: what they hold is theirs
    if (nn::as_lora_layer(child.value().get()) == nullptr && nn::as_saved_module(child.value().get()) == nullptr)
      walk(*child.value(), path, out);
  }
}

bool can_rewire(const Site& site) { return nn::can_replace_child(*site.parent, site.name); }

std::string cannot_rewire(const Site& site, const char* what) {
  return nn::cannot_replace_message(*site.parent, site.path, what);
}

// Puts `replacement` where the site's module is, in the parent's registry and in what its forward calls.
void rewire(const Site& site, std::shared_ptr<Module> replacement) {
  TORCH_CHECK_VALUE(nn::replace_child(*site.parent, site.name, std::move(replacement)),
                    cannot_rewire(site, "lorafuse"));
}

using detail::join;
using detail::sites_of;
using detail::tables_of;

std::string with_commas(int64_t n) {
  std::string digits = std::to_string(n < 0 ? -n : n);
  std::string out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return n < 0 ? "-" + out : out;
}

// Model-wide merges are all or nothing: a layer's merge can still fail (non-finite weights), and the
// layers merged before it are then put back as they were (merge starts from the unmerged weight, so
// re-merging what was merged before reproduces the same bits).
class MergeTransaction {
 public:
  void merge(LoraLayer* layer, const std::vector<std::string>& names, bool requantize = false) {
    undo_.push_back({layer, layer->merged_adapters(), !layer->adapters_enabled()});
    if (!layer->adapters_enabled()) layer->enable_adapters();
    layer->merge(names, requantize);
  }
  void rollback() {
    for (auto it = undo_.rbegin(); it != undo_.rend(); ++it) {
      if (it->layer->merged()) it->layer->unmerge();
      // what was merged before: into 4 bits only ever with requantize (dense layers ignore the flag); re-merging
      // from the unmerged bytes reproduces the same bytes
      if (!it->merged_before.empty()) it->layer->merge(it->merged_before, /*requantize=*/true);
      if (it->was_disabled) it->layer->disable_adapters();
    }
    undo_.clear();
  }

 private:
  struct Undo {
    LoraLayer* layer;
    std::vector<std::string> merged_before;
    bool was_disabled;
  };
  std::vector<Undo> undo_;
};

}  // namespace

namespace detail {

std::vector<Site> sites_of(Module& module) {
  std::vector<Site> sites;
  walk(module, "", sites);
  return sites;
}

bool is_linear(const Module* m) { return nn::base_kind_of(*m) != nullptr || nn::as_lora_layer(m) != nullptr; }

std::vector<ModuleInfo> infos_of(const std::vector<Site>& sites) {
  std::vector<ModuleInfo> infos;
  infos.reserve(sites.size());
  for (const auto& s : sites) {
    ModuleInfo info{s.path, s.module->name(), is_linear(s.module.get())};
    if (const auto* lora = nn::as_lora_layer(s.module.get())) {
      info.in_features = lora->in_features();
      info.out_features = lora->out_features();
    } else if (const auto* kind = nn::base_kind_of(*s.module)) {
      info.in_features = kind->in_features(*s.module);
      info.out_features = kind->out_features(*s.module);
    }
    const auto* lora = nn::as_lora_layer(s.module.get());
    const auto* kind = nn::base_kind_of(lora != nullptr ? *lora->base_module() : *s.module);
    if (kind != nullptr && kind->embedding()) {  // an embedding: named targets only, its own tensor names in files
      info.is_embedding = true;
      info.is_linear = false;
    }
    if (kind != nullptr && kind->attention()) {  // an attention: named targets only, two parts in files
      info.is_attention = true;
      info.is_linear = false;
    }
    if (s.parent->as<torch::nn::MultiheadAttentionImpl>() != nullptr && info.is_linear) {
      // the attention reads its out_proj's weight without calling it: a LoRA branch there would never run
      info.is_linear = false;
      info.type_name +=
          " (a MultiheadAttention's out_proj, which the attention reads without calling; target the "
          "attention itself)";
    }
    info.is_saved_module = nn::as_saved_module(s.module.get()) != nullptr;
    info.is_lora_layer = lora != nullptr || info.is_saved_module;
    infos.push_back(std::move(info));
  }
  return infos;
}

std::vector<TargetChoice> select_in(const Module& root, const std::vector<Site>& sites, const LoraConfig& config) {
  auto infos = infos_of(sites);
  const auto* pretrained = dynamic_cast<const nn::PretrainedModel*>(&root);
  if (pretrained == nullptr) return select_targets(infos, config);
  const auto output = pretrained->output_layer();
  for (auto& info : infos) info.is_output_layer = !output.empty() && info.path == output;
  return select_targets(infos, config, pretrained->model_type());
}

void keep_base_dtype(const std::vector<Site>& sites, std::vector<TargetChoice>& chosen) {
  for (auto& c : chosen) {
    if (c.adapter.dtype()) continue;
    const auto* lora = nn::as_lora_layer(sites[c.index].module.get());
    const auto base = lora != nullptr ? lora->base_module() : sites[c.index].module;
    const auto* kind = nn::base_kind_of(*base);
    if (kind != nullptr) c.adapter.dtype(kind->compute_dtype(*base));
  }
}

void check_rewirable(const std::vector<Site>& sites, const std::vector<TargetChoice>& chosen, const char* what) {
  for (const auto& c : chosen) {
    const Site& s = sites[c.index];
    if (nn::as_lora_layer(s.module.get()) == nullptr) {  // a base to replace
      TORCH_CHECK_VALUE(can_rewire(s), cannot_rewire(s, what));
      if (const auto* attention = s.module->as<torch::nn::MultiheadAttentionImpl>()) {
        nn::check_attention(*attention, "target_modules: \"" + s.path + "\"");
      }
    }
  }
}

std::string join(const std::vector<std::string>& names) { return nn::AdapterTable::join(names); }

void check_loftq(const std::vector<Site>& sites, const std::vector<TargetChoice>& chosen) {
  for (const auto& c : chosen) {
    if (!c.adapter.init_lora_weights().changes_base()) continue;
    const std::string init = c.adapter.init_lora_weights().str();
    const Site& s = sites[c.index];
    at::Tensor weight;
    const nn::AdapterTable* table = nullptr;
    if (const auto* lora = s.module->as<nn::LoraLinearImpl>()) {
      weight = lora->base_layer->weight;
      table = &lora->adapters();
    } else if (const auto* linear = s.module->as<torch::nn::LinearImpl>()) {
      weight = linear->weight;
    }
    TORCH_CHECK_VALUE(
        weight.defined(), "init_lora_weights \"", init, "\": \"", s.path, "\" (", s.module->name(),
        ") has no full-precision torch::nn::Linear weight to start from (a quantized base: start from the "
        "full-precision model, then quantize it)");
    nn::check_loftq_weight(s.path, weight, c.adapter.r(), table, init);
  }
}

void check_dora(const std::vector<Site>& sites, const std::vector<TargetChoice>& chosen) {
  for (const auto& c : chosen) {
    if (!c.adapter.use_dora()) continue;
    const Site& s = sites[c.index];
    const bool dense =
        s.module->as<nn::LoraLinearImpl>() != nullptr || s.module->as<torch::nn::LinearImpl>() != nullptr;
    TORCH_CHECK_VALUE(dense, "use_dora: \"", s.path, "\" (", s.module->name(),
                      ") has no full-precision torch::nn::Linear weight for DoRA to rescale (DoRA over quantized bases "
                      "and embeddings is not supported yet)");
  }
}

rules::LayerTables tables_of(const std::vector<std::pair<std::string, LoraLayer*>>& layers) {
  rules::LayerTables tables;
  tables.reserve(layers.size());
  for (const auto& [path, layer] : layers) tables.emplace_back(path, &layer->adapters());
  return tables;
}

InjectReport attach_adapter(const std::vector<Site>& sites, const std::vector<TargetChoice>& chosen,
                            const std::string& name, bool keep_active,
                            const std::function<void(size_t, LoraLayer&)>& fill) {
  rules::LayerTables existing;
  for (const auto& s : sites) {
    if (auto* lora = nn::as_lora_layer(s.module.get())) existing.emplace_back(s.path, &lora->adapters());
  }
  const bool all_disabled = rules::starts_disabled(existing);
  InjectReport report;
  report.adapter_name = name;
  for (const auto& chosen_site : chosen) {
    TargetChoice c = chosen_site;
    // adapters loaded from a file take its weights: LoftQ ran when they were made and must not quantize the base again
    if (fill && c.adapter.init_lora_weights().changes_base()) {
      c.adapter.init_lora_weights(true);
    }
    const Site& s = sites[c.index];
    if (auto* lora = nn::as_lora_layer(s.module.get())) {
      lora->add_adapter(name, c.adapter, /*activate=*/!keep_active);
      if (fill) fill(c.index, *lora);
    } else {
      const nn::BaseKind* kind = nn::base_kind_of(*s.module);
      TORCH_CHECK_VALUE(kind != nullptr, "inject: \"", s.path, "\" (", s.module->name(),
                        ") is no base kind lorafuse can wrap");
      std::shared_ptr<Module> wrapped = kind->wrap(s.module, c.adapter, name);
      LoraLayer* layer = nn::as_lora_layer(wrapped.get());
      wrapped->train(s.module->is_training());      // a new module starts in training mode; keep the model's mode
      if (all_disabled) layer->disable_adapters();  // a model whose adapters are disabled stays so
      if (keep_active) layer->clear_active_adapter();
      if (fill) fill(c.index, *layer);
      rewire(s, wrapped);
      report.wrapped.push_back(s.path);
    }
    report.targets.push_back(s.path);
  }
  return report;
}

void check_saved(const Module& root, const std::vector<Site>& sites, const std::vector<size_t>& saved,
                 const char* what) {
  std::vector<std::string> paths;
  for (const size_t i : saved) {
    const Site& s = sites[i];
    if (nn::as_saved_module(s.module.get()) != nullptr) continue;
    TORCH_CHECK_VALUE(can_rewire(s), cannot_rewire(s, what));
    nn::check_saved_module(*s.module, s.path);
    paths.push_back(s.path);
  }
  lorafuse::check_not_tied(root, paths, "modules_to_save",
                           "a copy of it per adapter would untie them, so the model would compute something else (PEFT "
                           "ties such copies; lorafuse does not yet). Untie them first, or leave the module out of "
                           "modules_to_save");
}

void attach_saved(const std::vector<Site>& sites, const std::vector<size_t>& saved, const LoraConfig& config,
                  const std::string& name, bool keep_active,
                  const std::function<void(size_t, nn::ModulesToSaveImpl&)>& fill) {
  bool all_disabled = false;
  {
    rules::LayerTables existing;
    for (const auto& s : sites) {
      if (auto* lora = nn::as_lora_layer(s.module.get())) existing.emplace_back(s.path, &lora->adapters());
    }
    all_disabled = rules::starts_disabled(existing);
  }
  for (const size_t i : saved) {
    const Site& s = sites[i];
    const auto options = config.adapter_for(s.path);
    if (auto* wrapper = nn::as_saved_module(s.module.get())) {
      wrapper->add_adapter(name, options, /*activate=*/!keep_active);
      if (fill) fill(i, *wrapper);
      continue;
    }
    auto wrapper = std::make_shared<nn::ModulesToSaveImpl>(s.module, name, options, /*activate=*/!keep_active);
    wrapper->train(s.module->is_training());
    if (all_disabled) wrapper->disable_adapters();
    if (fill) fill(i, *wrapper);
    rewire(s, wrapper);
  }
}

void activate_and_freeze(Module& module, const std::string& active) {
  for (auto& p : module.parameters()) p.set_requires_grad(false);
  set_adapter(module, active);
  // The active adapter's bias mode decides, as in PEFT (a later adapter's config waits until it is active).
  for (auto& [name, bias] : trained_bias_parameters(module, active)) bias.set_requires_grad(true);
}

std::vector<std::pair<std::string, at::Tensor>> trained_bias_parameters(Module& module, const std::string& adapter) {
  const auto params = module.named_parameters();
  std::vector<std::string> names;
  for (const auto& p : params) names.push_back(p.key());
  std::vector<std::pair<std::string, at::Tensor>> out;
  std::vector<std::string> kept;
  for (const auto& [path, wrapper] : saved_modules(module)) kept.push_back(path);
  const auto layers = lora_layers(module);
  auto tables = tables_of(layers);
  for (const auto& [path, layer] : layers) {  // an attention's output projection: a layer of its own for bias modes
    if (auto* attention = layer->module().as<nn::LoraMultiheadAttentionImpl>())
      tables.emplace_back(path + ".base_layer.out_proj", &attention->out_proj_adapters->adapters.table());
  }
  for (const auto& name : rules::trained_biases(tables, names, adapter, kept)) out.emplace_back(name, params[name]);
  return out;
}

}  // namespace detail

std::vector<std::pair<std::string, LoraLayer*>> lora_layers(Module& module) {
  std::vector<std::pair<std::string, LoraLayer*>> layers;
  for (const auto& s : sites_of(module)) {
    if (auto* lora = nn::as_lora_layer(s.module.get())) layers.emplace_back(s.path, lora);
  }
  return layers;
}

std::vector<std::pair<std::string, nn::ModulesToSaveImpl*>> saved_modules(Module& module) {
  std::vector<std::pair<std::string, nn::ModulesToSaveImpl*>> out;
  for (const auto& s : sites_of(module)) {
    if (auto* wrapper = nn::as_saved_module(s.module.get())) out.emplace_back(s.path, wrapper);
  }
  return out;
}

std::vector<std::string> adapter_names(Module& module) { return rules::adapter_names(tables_of(lora_layers(module))); }

std::string active_adapter(Module& module) { return rules::active_adapter(tables_of(lora_layers(module))); }

InjectReport inject_lora(Module& module, const LoraConfig& config, const std::string& adapter_name,
                         bool autocast_adapter_dtype) {
  config.validate();
  nn::check_adapter_name(adapter_name);
  TORCH_CHECK_VALUE(!detail::is_linear(&module),
                    "module: inject_lora replaces layers inside a model, and this model is itself a "
                    "Linear layer; wrap it in lorafuse::nn::LoraLinear instead");
  rules::check_new_adapter(tables_of(lora_layers(module)), adapter_name);
  // Everything is checked before anything changes.
  const auto sites = sites_of(module);
  auto chosen = detail::select_in(module, sites, config);
  std::vector<size_t> lora;
  for (const auto& c : chosen) lora.push_back(c.index);
  const auto saved = select_saved_modules(detail::infos_of(sites), config, /*strict=*/true, nullptr, lora);
  if (!autocast_adapter_dtype) detail::keep_base_dtype(sites, chosen);
  detail::check_rewirable(sites, chosen, "inject_lora");
  detail::check_saved(module, sites, saved, "inject_lora");
  detail::check_loftq(sites, chosen);
  detail::check_dora(sites, chosen);

  const std::string prior_active = active_adapter(module);
  InjectReport report = detail::attach_adapter(sites, chosen, adapter_name, /*keep_active=*/false);
  detail::attach_saved(sites, saved, config, adapter_name, /*keep_active=*/false);
  for (const size_t i : saved) report.saved.push_back(sites[i].path);
  detail::activate_and_freeze(module, prior_active.empty() ? adapter_name : prior_active);
  const auto count = trainable_parameters(module);
  report.trainable = count.trainable;
  report.total = count.total;
  return report;
}

InjectReport add_adapter(Module& module, const std::string& adapter_name, const LoraConfig& config,
                         bool autocast_adapter_dtype) {
  return inject_lora(module, config, adapter_name, autocast_adapter_dtype);
}

double ParameterCount::percent() const {
  return total == 0 ? 0.0 : 100.0 * static_cast<double>(trainable) / static_cast<double>(total);
}

std::string ParameterCount::str() const {
  char pct[32];
  std::snprintf(pct, sizeof(pct), "%.4f", percent());
  return "trainable params: " + with_commas(trainable) + " || all params: " + with_commas(total) +
         " || trainable%: " + pct;
}

ParameterCount trainable_parameters(const Module& module) {
  ParameterCount count;
  std::unordered_set<const void*> seen;  // tied weights count once
  for (const auto& p : module.parameters()) {
    if (!seen.insert(p.unsafeGetTensorImpl()).second) continue;
    count.total += p.numel();
    if (p.requires_grad()) count.trainable += p.numel();
  }
  // a 4-bit weight (buffers) counts its out × in parameters, as PEFT counts bitsandbytes' 4-bit weights
  for (const auto& m : module.modules()) {
    if (const auto* q = m->as<nn::Linear4bitImpl>())
      count.total += q->options.in_features() * q->options.out_features();
  }
  return count;
}

void print_trainable_parameters(const Module& module, std::ostream& out) {
  out << trainable_parameters(module).str() << "\n";
}

void print_trainable_parameters(const Module& module) { print_trainable_parameters(module, std::cout); }

void set_adapter(Module& module, const std::string& adapter_name) {
  const auto layers = lora_layers(module);
  const auto plan = rules::plan_set_adapter(tables_of(layers), adapter_name);
  for (size_t i = 0; i < layers.size(); ++i) {
    if (plan[i].empty()) {
      layers[i].second->clear_active_adapter();
    } else {
      layers[i].second->set_adapter(plan[i]);
    }
  }
  for (const auto& [path, wrapper] : saved_modules(module)) {  // PEFT: its copy if it has one, else the original
    if (wrapper->adapters().has(adapter_name)) {
      wrapper->set_adapter(adapter_name);
    } else {
      wrapper->clear_active_adapter();
    }
  }
}

void disable_adapters(Module& module) {
  for (const auto& [path, layer] : lora_layers(module)) layer->disable_adapters();
  for (const auto& [path, wrapper] : saved_modules(module)) wrapper->disable_adapters();
}

void enable_adapters(Module& module) {
  for (const auto& [path, layer] : lora_layers(module)) layer->enable_adapters();
  for (const auto& [path, wrapper] : saved_modules(module)) wrapper->enable_adapters();
}

void delete_adapter(Module& module, const std::string& adapter_name) {
  const auto layers = lora_layers(module);
  const auto next_active = rules::plan_delete_adapter(tables_of(layers), adapter_name);
  const auto wrappers = saved_modules(module);
  for (const auto& [path, layer] : layers) {
    if (layer->has_adapter(adapter_name)) layer->delete_adapter(adapter_name);
  }
  for (const auto& [path, wrapper] : wrappers) {
    if (wrapper->adapters().has(adapter_name)) wrapper->delete_adapter(adapter_name);
  }
  if (next_active) {
    if (next_active->empty()) {
      for (const auto& [path, layer] : layers) layer->clear_active_adapter();
      for (const auto& [path, wrapper] : wrappers) wrapper->clear_active_adapter();
    } else {
      set_adapter(module, *next_active);
    }
  }
}

std::map<std::string, nn::MergeError> merge_adapter(Module& module,
                                                    const std::vector<std::string>& adapter_names_to_merge,
                                                    bool requantize) {
  const auto layers = lora_layers(module);
  const auto plan = rules::plan_merge(tables_of(layers), adapter_names_to_merge, "merge_adapter");
  std::vector<std::pair<std::string, LoraLayer*>> merging;
  for (size_t i = 0; i < layers.size(); ++i) {
    if (!plan[i].empty()) merging.push_back(layers[i]);
  }
  check_not_tied(module, merging, "merge_adapter");
  MergeTransaction transaction;
  try {
    for (size_t i = 0; i < layers.size(); ++i) {
      if (!plan[i].empty()) transaction.merge(layers[i].second, plan[i], requantize);
    }
  } catch (...) {
    transaction.rollback();
    throw;
  }
  std::map<std::string, nn::MergeError> rounded;
  for (const auto& [path, layer] : layers) {
    if (const auto error = layer->merge_error()) rounded.emplace(path, *error);
  }
  return rounded;
}

void unmerge_adapter(Module& module) {
  const auto layers = lora_layers(module);
  rules::check_unmerge(tables_of(layers), "unmerge_adapter");
  for (const auto& [path, layer] : layers) {
    if (layer->merged()) layer->unmerge();
  }
}

namespace {

// The modules-to-save layers of `module`, each checked replaceable: merge_and_unload and unload put the active
// adapter's copy (or the original) in their place, as PEFT does.
std::vector<Site> saved_sites(Module& module, const char* what) {
  std::vector<Site> out;
  for (auto& s : sites_of(module)) {
    if (nn::as_saved_module(s.module.get()) == nullptr) continue;
    TORCH_CHECK_VALUE(can_rewire(s), cannot_rewire(s, what));
    out.push_back(std::move(s));
  }
  return out;
}

void unload_saved(const std::vector<Site>& sites) {
  for (const auto& s : sites) rewire(s, nn::as_saved_module(s.module.get())->unloaded());
}

}  // namespace

void merge_and_unload(Module& module) {
  const auto wrappers = saved_sites(module, "merge_and_unload");
  std::vector<Site> lora_sites;
  for (auto& s : sites_of(module)) {
    if (nn::as_lora_layer(s.module.get()) == nullptr) continue;
    TORCH_CHECK_VALUE(can_rewire(s), cannot_rewire(s, "merge_and_unload"));
    lora_sites.push_back(std::move(s));
  }
  // Bases that are not merged in place (4-bit) give their dense replacement first, computed without changing
  // anything; then every other active adapter is merged (all or nothing); then the layers are swapped, which
  // cannot fail.
  std::vector<std::shared_ptr<Module>> dense(lora_sites.size());
  for (size_t i = 0; i < lora_sites.size(); ++i) {
    dense[i] = nn::as_lora_layer(lora_sites[i].module.get())->unloaded_dense();
  }
  std::vector<std::pair<std::string, LoraLayer*>> merging;
  for (size_t i = 0; i < lora_sites.size(); ++i) {
    auto* layer = nn::as_lora_layer(lora_sites[i].module.get());
    if (dense[i] == nullptr && !layer->adapters().plan_unload().empty())
      merging.emplace_back(lora_sites[i].path, layer);
  }
  check_not_tied(module, merging, "merge_and_unload");
  MergeTransaction transaction;
  try {
    for (size_t i = 0; i < lora_sites.size(); ++i) {
      auto* layer = nn::as_lora_layer(lora_sites[i].module.get());
      if (dense[i] == nullptr && !layer->adapters().plan_unload().empty()) {
        transaction.merge(layer, {layer->active_adapter()});
      }
    }
  } catch (...) {
    transaction.rollback();
    throw;
  }
  for (size_t i = 0; i < lora_sites.size(); ++i) {
    rewire(lora_sites[i], dense[i] ? dense[i] : nn::as_lora_layer(lora_sites[i].module.get())->unload_merged());
  }
  unload_saved(wrappers);
}

std::vector<std::string> unload(Module& module) {
  const auto wrappers = saved_sites(module, "unload");
  std::vector<Site> lora_sites;
  for (auto& s : sites_of(module)) {
    if (nn::as_lora_layer(s.module.get()) == nullptr) continue;
    TORCH_CHECK_VALUE(can_rewire(s), cannot_rewire(s, "unload"));
    lora_sites.push_back(std::move(s));
  }
  std::vector<std::string> paths;
  for (const auto& s : lora_sites) {
    rewire(s, nn::as_lora_layer(s.module.get())->base_module());
    paths.push_back(s.path);
  }
  unload_saved(wrappers);
  for (const auto& s : wrappers) paths.push_back(s.path);
  return paths;
}

}  // namespace lorafuse
