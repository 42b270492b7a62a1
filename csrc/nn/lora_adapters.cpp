#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <lorafuse/nn/linear.h>
#include <lorafuse/nn/lora_adapters.h>
#include <lorafuse/ops/dora.h>
#include <lorafuse/ops/merge.h>
#include <torch/csrc/autograd/grad_mode.h>

namespace lorafuse::nn {

void DoraMagnitudeImpl::reset() { weight = register_parameter("weight", at::empty({out_features_}, options_)); }

void LoraAdapters::reset(torch::nn::Module& owner, int64_t in_features, int64_t out_features,
                         const at::TensorOptions& base, const at::Tensor& dense_weight, bool embedding) {
  in_features_ = in_features;
  out_features_ = out_features;
  embedding_ = embedding;
  lora_A = owner.register_module(embedding ? "lora_embedding_A" : "lora_A", torch::nn::ModuleDict());
  lora_B = owner.register_module(embedding ? "lora_embedding_B" : "lora_B", torch::nn::ModuleDict());
  lora_magnitude_vector = nullptr;
  const auto base_dtype = c10::typeMetaToScalarType(base.dtype());
  for (const auto& name : table_.names()) {
    const auto& adapter = table_.options(name);
    create_weights(owner, name, base.dtype(adapter_dtype(adapter, base_dtype)), adapter);
    init_adapter_weights(lora_a(name), lora_b(name), adapter, embedding_);
    if (adapter.use_dora() && dense_weight.defined()) init_magnitude(name, dense_weight);
  }
  apply_trainability();
  refresh_routes();
}

void LoraAdapters::reset_parameters(const at::Tensor& dense_weight) {
  for (const auto& name : table_.names()) {
    init_adapter_weights(lora_a(name), lora_b(name), table_.options(name), embedding_);
    if (table_.options(name).use_dora() && dense_weight.defined()) init_magnitude(name, dense_weight);
  }
}

void LoraAdapters::create_weights(torch::nn::Module& owner, const std::string& name, const at::TensorOptions& options,
                                  const LoraAdapterOptions& adapter) {
  if (adapter.use_dora() && lora_magnitude_vector.is_empty()) {
    lora_magnitude_vector = owner.register_module("lora_magnitude_vector", torch::nn::ModuleDict());
  }
  lora_A->update({{name, make_linear(in_features_, adapter.r(), false, options).ptr()}});
  lora_B->update({{name, make_linear(adapter.r(), out_features_, false, options).ptr()}});
  if (adapter.use_dora()) lora_magnitude_vector->update({{name, DoraMagnitude(out_features_, options).ptr()}});
}

void LoraAdapters::init_magnitude(const std::string& name, const at::Tensor& dense_weight) {
  // PEFT: the row norms of W + scale·B·A for the adapter's starting A and B (‖W‖ when B starts at zero)
  torch::NoGradGuard no_grad;
  lora_magnitude(name).copy_(
      lorafuse::dora_weight_norm(dense_weight, lora_a(name), lora_b(name), table_.options(name).scale()));
}

std::vector<torch::nn::ModuleDict*> LoraAdapters::dicts_of(const std::string& name) {
  std::vector<torch::nn::ModuleDict*> dicts = {&lora_A, &lora_B};
  if (!lora_magnitude_vector.is_empty() && lora_magnitude_vector->contains(name)) {
    dicts.push_back(&lora_magnitude_vector);
  }
  return dicts;
}

void LoraAdapters::add(torch::nn::Module& owner, const std::string& name, const LoraAdapterOptions& adapter,
                       bool activate, const at::TensorOptions& base, const at::Tensor& dense_weight,
                       const std::string& refusal) {
  const auto dtype = table_.check_add(name, adapter, c10::typeMetaToScalarType(base.dtype()));
  const bool loftq = adapter.init_lora_weights().changes_base();  // LoftQ, PiSSA, OLoRA
  const std::string init = adapter.init_lora_weights().str();
  TORCH_CHECK_VALUE(!embedding_ || !adapter.use_dora(), "add_adapter(\"", name,
                    "\"): use_dora = true: DoRA on embedding layers is not supported by lorafuse yet");
  TORCH_CHECK_VALUE(!embedding_ || !loftq, "add_adapter(\"", name, "\"): init_lora_weights \"", init,
                    "\": lorafuse starts an embedding layer's adapter only as PEFT's default does (A zeros, B normal)");
  TORCH_CHECK_VALUE(!adapter.use_dora() || dense_weight.defined(), "add_adapter(\"", name,
                    "\"): use_dora = true: DoRA rescales the rows of the layer's full-precision weight, and this "
                    "layer has none (a quantized base); lorafuse does not support DoRA over quantized bases yet");
  if (loftq) {
    TORCH_CHECK_VALUE(dense_weight.defined(), "add_adapter(\"", name, "\"): init_lora_weights \"", init,
                      "\" changes the layer's full-precision weight and starts the adapter from it; ",
                      refusal.empty() ? "this layer has no such weight" : refusal);
    check_loftq_weight("add_adapter(" + name + ")", dense_weight, adapter.r(), &table_, init);
  }
  create_weights(owner, name, base.dtype(dtype), adapter);
  if (loftq) {  // before the table changes: an error (in the decomposition, before any write) leaves the layer as it
                // was
    try {
      init_adapter_weights_from_base(dense_weight, lora_A[name]->as<torch::nn::LinearImpl>()->weight,
                                     lora_B[name]->as<torch::nn::LinearImpl>()->weight, adapter);
    } catch (...) {
      for (auto* dict : dicts_of(name)) {
        (*dict)->pop(name);
        (*dict)->unregister_module(name);
      }
      throw;
    }
  }
  table_.add(name, adapter, activate);
  if (!loftq) init_adapter_weights(lora_a(name), lora_b(name), adapter, embedding_);
  if (adapter.use_dora()) init_magnitude(name, dense_weight);  // after LoftQ/PiSSA/OLoRA changed the weight (PEFT)
  // A new active adapter changes every adapter's flags; else only the new one's: other threads may be running
  // the others.
  if (table_.trains(name)) {
    apply_trainability();
  } else {
    lora_a(name).set_requires_grad(false);
    lora_b(name).set_requires_grad(false);
    if (adapter.use_dora()) lora_magnitude(name).set_requires_grad(false);
  }
  refresh_routes();
}

void LoraAdapters::activate(const std::string& name, const std::function<void()>& unmerge) {
  if (table_.check_activate(name)) unmerge();
  table_.activate(name);
  apply_trainability();
}

void LoraAdapters::clear_active(const std::function<void()>& unmerge) {
  if (table_.check_clear()) unmerge();
  table_.clear_active();
  apply_trainability();
}

void LoraAdapters::disable(const std::function<void()>& unmerge) {
  if (!table_.merged().empty()) unmerge();
  table_.set_enabled(false);
  for (const auto& name : table_.names()) {  // as PEFT: disabling freezes every adapter (a switch activates one again)
    lora_a(name).set_requires_grad(false);
    lora_b(name).set_requires_grad(false);
    if (table_.options(name).use_dora()) lora_magnitude(name).set_requires_grad(false);
  }
}

void LoraAdapters::remove(const std::string& name) {
  table_.check_remove(name);
  for (auto* dict : dicts_of(name)) {
    (*dict)->pop(name);
    (*dict)->unregister_module(name);
  }
  const bool new_active = table_.remove(name);
  refresh_routes();
  if (new_active) apply_trainability();
}

at::Tensor& LoraAdapters::lora_a(const std::string& name) {
  table_.options(name, "lora_a");
  return lora_A[name]->as<torch::nn::LinearImpl>()->weight;
}

at::Tensor& LoraAdapters::lora_b(const std::string& name) {
  table_.options(name, "lora_b");
  return lora_B[name]->as<torch::nn::LinearImpl>()->weight;
}

at::Tensor& LoraAdapters::lora_magnitude(const std::string& name) {
  TORCH_CHECK_VALUE(table_.options(name, "lora_magnitude").use_dora(), "lora_magnitude: adapter \"", name,
                    "\" is not a DoRA adapter (use_dora = false); it has no magnitude vector");
  return lora_magnitude_vector[name]->as<DoraMagnitudeImpl>()->weight;
}

at::Tensor LoraAdapters::delta_weight(const std::string& name) const {
  const auto& adapter = table_.options(name, "delta_weight");
  const auto& a = lora_A->operator[](name)->as<torch::nn::LinearImpl>()->weight;  // [r, in]
  const auto& b = lora_B->operator[](name)->as<torch::nn::LinearImpl>()->weight;  // [out, r]
  torch::NoGradGuard no_grad;
  return lorafuse::lora_delta_weight(a, b, adapter.scale());  // [out, in]
}

void LoraAdapters::merge_inputs(const std::vector<std::string>& names, std::vector<at::Tensor>& as,
                                std::vector<at::Tensor>& bs, std::vector<double>& scales,
                                std::vector<at::Tensor>& magnitudes) const {
  for (const auto& name : names) {
    const auto& adapter = table_.options(name, "merge");
    scales.push_back(adapter.scale());
    as.push_back(lora_A->operator[](name)->as<torch::nn::LinearImpl>()->weight);
    bs.push_back(lora_B->operator[](name)->as<torch::nn::LinearImpl>()->weight);
    magnitudes.push_back(adapter.use_dora() ? lora_magnitude_vector->operator[](name)->as<DoraMagnitudeImpl>()->weight
                                            : at::Tensor());
  }
}

void LoraAdapters::merge_dense(at::Tensor& weight, bool transposed, at::Tensor& unmerged,
                               const std::vector<std::string>& everything) {
  torch::NoGradGuard no_grad;
  const bool merged = !table_.merged().empty();
  const at::Tensor& original = merged ? unmerged : weight;
  std::vector<at::Tensor> as, bs, magnitudes;
  std::vector<double> scales;
  merge_inputs(everything, as, bs, scales, magnitudes);
  const at::Tensor folded =  // [out, in]; checks finiteness before anything changes
      lorafuse::lora_merge(transposed ? original.t() : original, as, bs, scales, magnitudes);
  if (!merged) unmerged.set_data(weight.clone());
  weight.copy_(transposed ? folded.t() : folded);
  table_.set_merged(everything);
}

void LoraAdapters::unmerge_dense(at::Tensor& weight, at::Tensor& unmerged) {
  table_.check_unmerge();
  torch::NoGradGuard no_grad;
  weight.copy_(unmerged);
  unmerged.set_data(at::empty({0}, weight.options()));
  table_.set_merged({});
}

void LoraAdapters::unload_dense(at::Tensor& weight, bool transposed, at::Tensor& unmerged) {
  const auto everything = table_.plan_unload();
  if (!everything.empty()) merge_dense(weight, transposed, unmerged, everything);
  if (!table_.merged().empty()) {  // the weight keeps what is merged: forget the copy
    unmerged.set_data(at::empty({0}, weight.options()));
    table_.set_merged({});
  }
  while (!table_.names().empty()) remove(table_.names().back());
}

void LoraAdapters::apply_trainability() {
  for (const auto& name : table_.names()) {
    lora_a(name).set_requires_grad(table_.trains(name));
    lora_b(name).set_requires_grad(table_.trains(name));
    if (table_.options(name).use_dora()) lora_magnitude(name).set_requires_grad(table_.trains(name));
  }
}

void LoraAdapters::refresh_routes() {
  auto routes = std::make_shared<RouteTable>();
  for (const auto& name : table_.names()) {
    const auto& adapter = table_.options(name);
    routes->emplace(
        name,
        Route{
            std::dynamic_pointer_cast<torch::nn::LinearImpl>(lora_A[name]),
            std::dynamic_pointer_cast<torch::nn::LinearImpl>(lora_B[name]), adapter.scale(), adapter.lora_dropout(),
            adapter.use_dora() ? std::dynamic_pointer_cast<DoraMagnitudeImpl>(lora_magnitude_vector[name]) : nullptr});
  }
  std::lock_guard<std::mutex> lock(route_lock_.mutex);
  routes_ = std::move(routes);
}

std::shared_ptr<const LoraAdapters::RouteTable> LoraAdapters::snapshot() const {
  // a consistent snapshot, whatever other threads add or remove meanwhile
  std::lock_guard<std::mutex> lock(route_lock_.mutex);
  return routes_;
}

std::optional<LoraAdapters::Route> LoraAdapters::route_of(const std::string& name) const {
  const auto routes = snapshot();
  const auto it = routes->find(name);
  if (it == routes->end()) return std::nullopt;
  return it->second;
}

std::vector<std::string> LoraAdapters::routed_names() const {
  const auto routes = snapshot();
  std::vector<std::string> names;
  names.reserve(routes->size());
  for (const auto& entry : *routes) names.push_back(entry.first);
  return names;
}

std::optional<LoraAdapters::Route> LoraAdapters::route() const {
  const std::string name = table_.route(AdapterScope::current());
  if (name.empty()) return std::nullopt;
  const auto routes = snapshot();
  const auto it = routes->find(name);
  if (it == routes->end()) return std::nullopt;  // removed by another thread meanwhile
  return it->second;
}

at::Tensor LoraAdapters::mixed_forward(const RowAdapters& rows, const at::Tensor& x, bool training,
                                       const std::function<at::Tensor()>& base,
                                       const std::function<at::Tensor(const Route&)>& single) const {
  const auto routes = snapshot();
  std::vector<std::string> available;
  available.reserve(routes->size());
  for (const auto& entry : *routes) available.push_back(entry.first);
  const RowAdapters::Plan plan = rows.plan(table_, available, x.sizes(), x.device());
  if (plan.adapters.empty()) return base();
  if (plan.uniform) return single(routes->at(plan.adapters.front()));
  std::vector<at::Tensor> as, bs;
  std::vector<double> scales, dropouts;
  for (const auto& name : plan.adapters) {
    const Route& r = routes->at(name);
    as.push_back(r.a->weight);
    bs.push_back(r.b->weight);
    scales.push_back(r.scale);
    dropouts.push_back(r.dropout);
  }
  const double p = rows.dropout(plan.adapters, dropouts, training);
  return lorafuse::lora_multi_add(base(), x, as, bs, scales, plan.segments, p);
}

}  // namespace lorafuse::nn
