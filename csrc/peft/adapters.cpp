#include <c10/util/Exception.h>
#include <lorafuse/nn/lora_attention.h>
#include <lorafuse/peft/adapters.h>
#include <lorafuse/peft/rules.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <algorithm>
#include <map>

#include "csrc/peft/sites.h"

namespace lorafuse {
namespace {

using nn::LoraLayer;

// The biases that train with the adapter, as PEFT saves them.
std::vector<std::pair<std::string, at::Tensor>> trained_biases(torch::nn::Module& module,
                                                               const std::string& adapter_name) {
  auto out = detail::trained_bias_parameters(module, adapter_name);
  std::vector<std::string> attentions;
  for (const auto& [path, layer] : lora_layers(module)) {
    if (layer->module().as<nn::LoraMultiheadAttentionImpl>() != nullptr) attentions.push_back(path);
  }
  for (auto& [name, bias] : out) {
    bias = bias.detach();
    // PEFT's name for an attention's output-projection bias (its out_proj is a LoRA layer there):
    // <path>.base_layer.out_proj.base_layer.bias, where LibTorch's is <path>.base_layer.out_proj.bias
    for (const auto& path : attentions) {
      if (name == path + ".base_layer.out_proj.bias") name = path + ".base_layer.out_proj.base_layer.bias";
    }
  }
  return out;
}

// The weight of a LoRA layer's base (a dense Linear's), which a file's base weight replaces.
at::Tensor base_weight_of(LoraLayer& layer) {
  auto params = layer.base_module()->named_parameters(/*recurse=*/false);
  TORCH_CHECK_VALUE(params.contains("weight"), "load_adapter: the file holds a base weight for a ",
                    layer.base_module()->name(), ", which has no full-precision weight to take it");
  return params["weight"];
}

// A file's base weight (PEFT's save_embedding_layers) fits the site's base: its shape, and no adapters merged into it.
void check_base_weight(const detail::Site& site, const at::Tensor& weight) {
  auto* layer = nn::as_lora_layer(site.module.get());
  const auto params = (layer != nullptr ? layer->base_module() : site.module)->named_parameters(/*recurse=*/false);
  TORCH_CHECK_VALUE(params.contains("weight") && params["weight"].sizes() == weight.sizes(), "load_adapter: \"",
                    site.path, "\": the file's base weight (", site.path, ".base_layer.weight) is ", weight.sizes(),
                    params.contains("weight") ? " but the layer's weight is " : " but the layer has no weight",
                    params.contains("weight") ? c10::str(params["weight"].sizes()) : "");
  TORCH_CHECK_VALUE(layer == nullptr || !layer->merged(), "load_adapter: \"", site.path,
                    "\": the file holds a base weight for it, and adapters are merged into its weight now; unmerge "
                    "first");
}

// A module's state as PEFT saves a modules_to_save copy: its state_dict (parameters, then buffers), detached.
std::vector<std::pair<std::string, at::Tensor>> state_of(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& p : module.named_parameters()) out.emplace_back(p.key(), p.value().detach());
  for (const auto& b : module.named_buffers()) out.emplace_back(b.key(), b.value().detach());
  return out;
}

// The file's state of a module kept whole fits the module (io::check_saved_state).
void check_saved_state(const detail::Site& site, const std::vector<std::pair<std::string, at::Tensor>>& state) {
  auto* wrapper = nn::as_saved_module(site.module.get());
  std::vector<std::pair<std::string, std::vector<int64_t>>> own;
  for (const auto& [key, t] : state_of(wrapper != nullptr ? *wrapper->original_module : *site.module))
    own.emplace_back(key, t.sizes().vec());
  io::check_saved_state(site.path, own, state);
}

}  // namespace

void save_adapter(torch::nn::Module& module, const std::string& dir, const std::string& adapter_name) {
  rules::require_adapter(detail::tables_of(lora_layers(module)), adapter_name, "save_adapter");
  const auto sites = detail::sites_of(module);
  const auto infos = detail::infos_of(sites);
  std::vector<io::SaveSource> layers;
  for (size_t i = 0; i < sites.size(); ++i) {
    auto* layer = nn::as_lora_layer(sites[i].module.get());
    if (layer == nullptr || !layer->has_adapter(adapter_name)) continue;
    const auto& options = layer->adapter_options(adapter_name);
    layers.push_back({i, options, layer->lora_a(adapter_name).detach(), layer->lora_b(adapter_name).detach(),
                      options.use_dora() ? layer->lora_magnitude(adapter_name).detach() : at::Tensor()});
    if (auto* attention = sites[i].module->as<nn::LoraMultiheadAttentionImpl>()) {  // its output projection
      layers.push_back({i, options, attention->out_proj_lora_a(adapter_name).detach(),
                        attention->out_proj_lora_b(adapter_name).detach(), at::Tensor(), /*out_proj=*/true});
    }
  }
  std::vector<io::SavedModule> saved;
  for (const auto& s : sites) {
    auto* wrapper = nn::as_saved_module(s.module.get());
    if (wrapper != nullptr && wrapper->adapters().has(adapter_name))
      saved.push_back({s.path, state_of(*wrapper->module_for(adapter_name))});
  }
  auto file = io::describe_adapter(infos, layers, trained_biases(module, adapter_name), std::move(saved));
  io::write_adapter(dir, file);
}

InjectReport load_adapter(torch::nn::Module& module, const std::string& dir, const std::string& adapter_name,
                          const LoadAdapterOptions& options) {
  nn::check_adapter_name(adapter_name);
  const io::AdapterFile file = io::read_adapter(dir);
  for (const auto& w : file.warnings) TORCH_WARN(w);
  return load_adapter(module, file, adapter_name, options);
}

InjectReport load_adapter(torch::nn::Module& module, const io::AdapterFile& file, const std::string& adapter_name,
                          const LoadAdapterOptions& options) {
  nn::check_adapter_name(adapter_name);
  TORCH_CHECK_VALUE(!detail::is_linear(&module),
                    "module: load_adapter puts adapters into layers inside a model, and this model is itself a "
                    "Linear layer; wrap it in lorafuse::nn::LoraLinear and load into a model holding it");
  rules::check_new_adapter(detail::tables_of(lora_layers(module)), adapter_name,
                           ". Load under another name, or delete_adapter first");
  // Everything is checked before anything changes.
  const auto sites = detail::sites_of(module);
  const auto infos = detail::infos_of(sites);
  const auto plan = io::plan_adapter_load(file, infos, options.partial());
  std::vector<std::string> warnings;
  const auto saved_plan = io::plan_saved_modules_load(file, infos, options.partial(), warnings, plan);
  for (const auto& w : warnings) TORCH_WARN(w);
  std::vector<size_t> saved;
  std::map<size_t, const io::SavedModuleLoad*> saved_by_index;
  for (const auto& s : saved_plan) {
    check_saved_state(sites[s.index], s.state);
    saved.push_back(s.index);
    saved_by_index[s.index] = &s;
  }
  std::vector<TargetChoice> chosen;
  std::map<size_t, const io::LoadTarget*> by_index, out_proj_of;  // out_proj_of: an attention's output projection
  for (const auto& t : plan) {
    if (t.out_proj) {
      out_proj_of[t.index] = &t;
      continue;
    }
    chosen.push_back({t.index, t.adapter});
    by_index[t.index] = &t;
    if (t.base_weight.defined()) check_base_weight(sites[t.index], t.base_weight);
  }
  if (!options.autocast_adapter_dtype()) detail::keep_base_dtype(sites, chosen);
  detail::check_rewirable(sites, chosen, "load_adapter");
  detail::check_saved(module, sites, saved, "load_adapter");
  detail::check_dora(sites, chosen);
  std::vector<std::pair<at::Tensor, at::Tensor>> bias_copies;  // (model parameter, file tensor)
  if (!file.biases.empty()) {
    const auto params = module.named_parameters();
    std::vector<std::pair<std::string, std::vector<int64_t>>> shapes, wanted;
    for (const auto& p : params) shapes.emplace_back(p.key(), p.value().sizes().vec());
    for (const auto& [path, t] : file.biases) wanted.emplace_back(path, t.sizes().vec());
    const auto targets = rules::match_biases(wanted, shapes, "load_adapter");
    for (size_t i = 0; i < targets.size(); ++i) bias_copies.emplace_back(params[targets[i]], file.biases[i].second);
  }

  const std::string prior_active = active_adapter(module);
  InjectReport report = detail::attach_adapter(
      sites, chosen, adapter_name, /*keep_active=*/!prior_active.empty(), [&](size_t index, LoraLayer& layer) {
        const auto* t = by_index.at(index);
        torch::NoGradGuard no_grad;
        layer.lora_a(adapter_name).copy_(t->lora_A);  // cast to the layer's adapter dtype
        layer.lora_b(adapter_name).copy_(t->lora_B);
        if (t->magnitude.defined()) layer.lora_magnitude(adapter_name).copy_(t->magnitude);
        if (t->base_weight.defined()) base_weight_of(layer).copy_(t->base_weight.view_as(base_weight_of(layer)));
        if (const auto out = out_proj_of.find(index); out != out_proj_of.end()) {
          auto* attention = layer.module().as<nn::LoraMultiheadAttentionImpl>();
          TORCH_CHECK(attention != nullptr, "load_adapter: internal error: an output projection for a non-attention");
          attention->out_proj_lora_a(adapter_name).copy_(out->second->lora_A);
          attention->out_proj_lora_b(adapter_name).copy_(out->second->lora_B);
        }
      });
  detail::attach_saved(sites, saved, file.config, adapter_name, /*keep_active=*/!prior_active.empty(),
                       [&](size_t index, nn::ModulesToSaveImpl& wrapper) {
                         auto copy = wrapper.module_for(adapter_name);
                         auto params = copy->named_parameters();
                         auto buffers = copy->named_buffers();
                         torch::NoGradGuard no_grad;
                         for (const auto& [key, t] : saved_by_index.at(index)->state) {
                           (params.contains(key) ? params[key] : buffers[key]).copy_(t);
                         }
                       });
  for (const auto& s : saved_plan) report.saved.push_back(sites[s.index].path);
  {
    torch::NoGradGuard no_grad;
    for (auto& [param, t] : bias_copies) param.copy_(t);
  }
  if (prior_active.empty()) {
    detail::activate_and_freeze(module, adapter_name);
    // PEFT's is_trainable=False: inference, the adapter does not train (nor the biases its bias mode names)
    if (!options.is_trainable()) {
      for (auto& p : module.parameters()) p.set_requires_grad(false);
    }
  }  // else it waits inactive, frozen; the active adapter keeps training as before (PEFT)
  // PEFT puts the model in eval mode; a model in eval mode already is not written to (other threads may be running
  // forward while an adapter loads beside theirs)
  if (!options.is_trainable()) {
    bool training = module.is_training();
    for (const auto& m : module.modules(/*include_self=*/false)) training = training || m->is_training();
    if (training) module.eval();
  }
  if (prior_active.empty()) {
    const auto count = trainable_parameters(module);
    report.trainable = count.trainable;
    report.total = count.total;
  }
  return report;
}

}  // namespace lorafuse
