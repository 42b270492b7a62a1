#include <c10/util/Exception.h>
#include <lorafuse/peft/adapters.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <map>

#include "csrc/peft/sites.h"

namespace lorafuse {
namespace {

using nn::LoraLayer;

// The trained biases that PEFT saves for `bias` mode: every bias ("all") or the adapted layers' ("lora_only").
std::vector<std::pair<std::string, at::Tensor>> trained_biases(torch::nn::Module& module, const std::string& bias,
                                                               const std::string& adapter_name) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  if (bias == "all") {
    for (const auto& p : module.named_parameters()) {
      if (TargetModules::matches_name(p.key(), "bias")) out.emplace_back(p.key(), p.value().detach());
    }
  } else if (bias == "lora_only") {
    for (const auto& [path, layer] : lora_layers(module)) {
      if (layer->has_adapter(adapter_name) && layer->base_bias().defined())
        out.emplace_back(path + ".base_layer.bias", layer->base_bias().detach());
    }
  }
  return out;
}

}  // namespace

void save_adapter(torch::nn::Module& module, const std::string& dir, const std::string& adapter_name) {
  const auto sites = detail::sites_of(module);
  const auto infos = detail::infos_of(sites);
  std::vector<io::SaveSource> layers;
  for (size_t i = 0; i < sites.size(); ++i) {
    auto* layer = nn::as_lora_layer(sites[i].module.get());
    if (layer == nullptr || !layer->has_adapter(adapter_name)) continue;
    layers.push_back({i, layer->adapter_options(adapter_name), layer->lora_a(adapter_name).detach(),
                      layer->lora_b(adapter_name).detach()});
  }
  TORCH_CHECK_VALUE(!layers.empty(), "save_adapter: no layer has an adapter named \"", adapter_name,
                    "\"; the model has ", detail::join(adapter_names(module)));
  auto file = io::describe_adapter(infos, layers, trained_biases(module, layers.front().adapter.bias(), adapter_name));
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
  TORCH_CHECK_VALUE(!detail::model_has_adapter(module, adapter_name),
                    "adapter_name: the model already has an adapter "
                    "named \"",
                    adapter_name, "\"; adapters: ", detail::join(adapter_names(module)),
                    ". Load under another name, or delete_adapter first");
  // Everything is checked before anything changes.
  const auto sites = detail::sites_of(module);
  const auto plan = io::plan_adapter_load(file, detail::infos_of(sites), options.partial());
  std::vector<TargetChoice> chosen;
  std::map<size_t, const io::LoadTarget*> by_index;
  for (const auto& t : plan) {
    chosen.push_back({t.index, t.adapter});
    by_index[t.index] = &t;
  }
  detail::check_rewirable(sites, chosen, "load_adapter");
  std::vector<std::pair<at::Tensor, at::Tensor>> bias_copies;  // (model parameter, file tensor)
  if (!file.biases.empty()) {
    std::map<std::string, at::Tensor> params;
    for (const auto& p : module.named_parameters()) params.emplace(p.key(), p.value());
    for (const auto& [path, t] : file.biases) {
      // A wrapped layer's bias is "<path>.base_layer.bias" (PEFT since 0.7), "<path>.bias" before wrapping.
      const std::string wrapped = ".base_layer.bias";
      const bool is_wrapped =
          path.size() > wrapped.size() && path.compare(path.size() - wrapped.size(), wrapped.size(), wrapped) == 0;
      const std::string alias = is_wrapped ? path.substr(0, path.size() - wrapped.size()) + ".bias"
                                           : path.substr(0, path.size() - 5) + wrapped;
      auto it = params.find(path);
      if (it == params.end()) it = params.find(alias);
      TORCH_CHECK_VALUE(it != params.end(), "load_adapter: the file has bias \"", path, "\", which the model lacks");
      TORCH_CHECK_VALUE(it->second.sizes() == t.sizes(), "load_adapter: bias \"", path, "\" is ", t.sizes(),
                        " in the file but ", it->second.sizes(), " in the model");
      bias_copies.emplace_back(it->second, t);
    }
  }

  const std::string prior_active = active_adapter(module);
  InjectReport report = detail::attach_adapter(
      sites, chosen, adapter_name, /*keep_active=*/!prior_active.empty(), [&](size_t index, LoraLayer& layer) {
        const auto* t = by_index.at(index);
        torch::NoGradGuard no_grad;
        layer.lora_a(adapter_name).copy_(t->lora_A);  // cast to the layer's adapter dtype
        layer.lora_b(adapter_name).copy_(t->lora_B);
      });
  {
    torch::NoGradGuard no_grad;
    for (auto& [param, t] : bias_copies) param.copy_(t);
  }
  if (prior_active.empty()) {
    detail::activate_and_freeze(module, adapter_name);
    const auto count = trainable_parameters(module);
    report.trainable = count.trainable;
    report.total = count.total;
  }
  return report;
}

}  // namespace lorafuse
