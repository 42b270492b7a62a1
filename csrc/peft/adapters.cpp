#include <c10/util/Exception.h>
#include <lorafuse/peft/adapters.h>
#include <lorafuse/peft/rules.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <map>

#include "csrc/peft/sites.h"

namespace lorafuse {
namespace {

using nn::LoraLayer;

// The biases that train with the adapter, as PEFT saves them.
std::vector<std::pair<std::string, at::Tensor>> trained_biases(torch::nn::Module& module,
                                                               const std::string& adapter_name) {
  auto out = detail::trained_bias_parameters(module, adapter_name);
  for (auto& [name, bias] : out) bias = bias.detach();
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
  }
  auto file = io::describe_adapter(infos, layers, trained_biases(module, adapter_name));
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
  const auto plan = io::plan_adapter_load(file, detail::infos_of(sites), options.partial());
  std::vector<TargetChoice> chosen;
  std::map<size_t, const io::LoadTarget*> by_index;
  for (const auto& t : plan) {
    chosen.push_back({t.index, t.adapter});
    by_index[t.index] = &t;
    if (t.base_weight.defined()) check_base_weight(sites[t.index], t.base_weight);
  }
  if (!options.autocast_adapter_dtype()) detail::keep_base_dtype(sites, chosen);
  detail::check_rewirable(sites, chosen, "load_adapter");
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
      });
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
