#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <lorafuse/nn/linear.h>
#include <lorafuse/nn/lora_linear.h>
#include <lorafuse/ops/lora_add.h>
#include <lorafuse/ops/lora_linear.h>
#include <lorafuse/ops/merge.h>
#include <torch/serialize/archive.h>

namespace lorafuse::nn {
namespace {

constexpr const char* kBackup = "weight_unmerged";

}  // namespace

LoraLinearImpl::LoraLinearImpl(const LoraLinearOptions& options_) : options(options_) {
  check_adapter_name(options.adapter_name());
  options.adapter().validate();
  pending_base_ = make_linear(options.in_features(), options.out_features(), options.bias());
  reset();
  add_adapter(options.adapter_name(), options.adapter());
}

LoraLinearImpl::LoraLinearImpl(torch::nn::Linear base, const LoraAdapterOptions& adapter,
                               const std::string& adapter_name)
    : options(0, 0) {
  TORCH_CHECK_VALUE(!base.is_empty(), "base: expected a torch::nn::Linear, found an empty holder");
  table_.check_add(adapter_name, adapter, base->weight.scalar_type());
  options = LoraLinearOptions(base->options.in_features(), base->options.out_features())
                .bias(base->options.bias())
                .adapter_name(adapter_name)
                .adapter(adapter);
  pending_base_ = std::move(base);
  reset();
  add_adapter(adapter_name, adapter);
}

void LoraLinearImpl::reset() {
  torch::nn::Linear base = std::move(pending_base_);
  pending_base_ = nullptr;
  const bool wrapping = !base.is_empty();
  if (!wrapping) {
    // Cloneable::clone: this is a copy whose base_layer still points at the original's. A placeholder
    // sharing it (no allocation) keeps the structure; clone() then overwrites it with a deep copy.
    TORCH_CHECK(!base_layer.is_empty(), "LoraLinear::reset: no base layer to wrap");
    base = torch::nn::Linear(std::make_shared<torch::nn::LinearImpl>(*base_layer));
  }
  base_layer = register_module("base_layer", base);
  if (wrapping) {  // the base is frozen; inject_lora's `bias` may thaw the bias again
    base_layer->weight.set_requires_grad(false);
    if (base_layer->bias.defined()) base_layer->bias.set_requires_grad(false);
  }
  lora_A = register_module("lora_A", torch::nn::ModuleDict());
  lora_B = register_module("lora_B", torch::nn::ModuleDict());
  const auto base_dtype = base_layer->weight.scalar_type();
  for (const auto& name : table_.names()) {
    const auto& adapter = table_.options(name);
    create_adapter_weights(name, adapter_dtype(adapter, base_dtype), adapter.r());
    init_adapter_weights(lora_a(name), lora_b(name), adapter);
  }
  // Holds the unmerged weight while anything is merged, else nothing ([0]). Registered, so that it
  // moves with to(), is cloned and is saved; set_data swaps its contents without touching the registry.
  weight_unmerged_ = register_buffer(kBackup, at::empty({0}, base_layer->weight.options()));
  apply_trainability();
  refresh_routes();
}

void LoraLinearImpl::refresh_routes() {
  auto table = std::make_shared<RouteTable>();
  for (const auto& name : table_.names()) {
    const auto& adapter = table_.options(name);
    table->emplace(name, Route{std::dynamic_pointer_cast<torch::nn::LinearImpl>(lora_A[name]),
                               std::dynamic_pointer_cast<torch::nn::LinearImpl>(lora_B[name]), adapter.scale(),
                               adapter.lora_dropout()});
  }
  std::lock_guard<std::mutex> lock(route_lock_.mutex);
  routes_ = std::move(table);
}

std::shared_ptr<const LoraLinearImpl::RouteTable> LoraLinearImpl::routes() const {
  std::lock_guard<std::mutex> lock(route_lock_.mutex);
  return routes_;
}

void LoraLinearImpl::reset_parameters() {
  for (const auto& name : table_.names()) init_adapter_weights(lora_a(name), lora_b(name), table_.options(name));
}

std::shared_ptr<torch::nn::Module> LoraLinearImpl::clone(const std::optional<torch::Device>& device) const {
  check_cloneable(*this, "LoraLinear::clone");
  auto copy = torch::nn::Cloneable<LoraLinearImpl>::clone(device);
  copy_requires_grad(*this, *copy);
  // Cloneable::clone puts fresh adapter modules into lora_A / lora_B after reset(): route to those.
  std::dynamic_pointer_cast<LoraLinearImpl>(copy)->refresh_routes();
  return copy;
}

at::Tensor& LoraLinearImpl::lora_a(const std::string& name) {
  table_.options(name, "lora_a");
  return lora_A[name]->as<torch::nn::LinearImpl>()->weight;
}

at::Tensor& LoraLinearImpl::lora_b(const std::string& name) {
  table_.options(name, "lora_b");
  return lora_B[name]->as<torch::nn::LinearImpl>()->weight;
}

at::Tensor LoraLinearImpl::delta_weight(const std::string& name) const {
  const auto& adapter = table_.options(name, "delta_weight");
  const auto& a = lora_A->operator[](name)->as<torch::nn::LinearImpl>()->weight;  // [r, in]
  const auto& b = lora_B->operator[](name)->as<torch::nn::LinearImpl>()->weight;  // [out, r]
  torch::NoGradGuard no_grad;
  return lorafuse::lora_delta_weight(a, b, adapter.scale());  // [out, in]
}

void LoraLinearImpl::create_adapter_weights(const std::string& name, c10::ScalarType dtype, int64_t r) {
  const auto tensor_options = base_layer->weight.options().dtype(dtype);
  lora_A->update({{name, make_linear(options.in_features(), r, false, tensor_options).ptr()}});
  lora_B->update({{name, make_linear(r, options.out_features(), false, tensor_options).ptr()}});
}

void LoraLinearImpl::apply_trainability() {
  for (const auto& name : table_.names()) {
    lora_a(name).set_requires_grad(table_.trains(name));
    lora_b(name).set_requires_grad(table_.trains(name));
  }
}

at::Tensor LoraLinearImpl::forward(const at::Tensor& x) {
  const std::string name = table_.route(AdapterScope::current());
  if (name.empty()) return base_layer->forward(x);
  const auto table = routes();  // a consistent snapshot, whatever other threads add or remove meanwhile
  const auto it = table->find(name);
  if (it == table->end()) return base_layer->forward(x);  // removed by another thread meanwhile
  const Route& route = it->second;
  const double p = is_training() ? route.dropout : 0.0;
  const auto& w = base_layer->weight;
  const auto& bias = base_layer->bias;
  const auto& a = route.a->weight;
  const auto& b = route.b->weight;
  if (w.requires_grad()) {
    // The fused op never computes a weight gradient; a caller who thawed the base weight gets the base's own
    // forward (autograd through its GEMM) and lora_add for the branch, as Python's call-as-is base kind.
    const auto& xa = a.scalar_type() == x.scalar_type() || a.scalar_type() == at::kFloat ? x : x.to(a.scalar_type());
    return lorafuse::lora_add(base_layer->forward(x), xa, a, b, route.scale, p);
  }
  return lorafuse::lora_linear(x, w, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt, a, b, route.scale,
                               p);
}

void LoraLinearImpl::add_adapter(const std::string& name, const LoraAdapterOptions& adapter) {
  add_adapter(name, adapter, /*activate=*/true);
}

void LoraLinearImpl::add_adapter(const std::string& name, const LoraAdapterOptions& adapter, bool activate) {
  const auto dtype = table_.check_add(name, adapter, base_layer->weight.scalar_type());
  create_adapter_weights(name, dtype, adapter.r());
  table_.add(name, adapter, activate);
  init_adapter_weights(lora_a(name), lora_b(name), adapter);
  // A new active adapter changes every adapter's flags; else only the new one's: other threads may be running
  // the others.
  if (table_.trains(name)) {
    apply_trainability();
  } else {
    lora_a(name).set_requires_grad(false);
    lora_b(name).set_requires_grad(false);
  }
  refresh_routes();
}

void LoraLinearImpl::set_adapter(const std::string& name) {
  if (table_.check_activate(name)) unmerge();
  table_.activate(name);
  apply_trainability();
}

void LoraLinearImpl::clear_active_adapter() {
  if (table_.check_clear()) unmerge();
  table_.clear_active();
  apply_trainability();
}

void LoraLinearImpl::delete_adapter(const std::string& name) {
  table_.check_remove(name);
  lora_A->pop(name);
  lora_A->unregister_module(name);
  lora_B->pop(name);
  lora_B->unregister_module(name);
  const bool new_active = table_.remove(name);
  refresh_routes();
  if (new_active) apply_trainability();
}

void LoraLinearImpl::disable_adapters() {
  if (merged()) unmerge();
  table_.set_enabled(false);
}

void LoraLinearImpl::enable_adapters() { table_.set_enabled(true); }

void LoraLinearImpl::merge(const std::vector<std::string>& adapter_names) {
  merge_into_base(table_.plan_merge(adapter_names));
}

void LoraLinearImpl::merge_into_base(const std::vector<std::string>& everything) {
  torch::NoGradGuard no_grad;
  auto& w = base_layer->weight;
  // Every merge starts from the unmerged weight, so merging adapters one by one rounds once.
  const at::Tensor& original = merged() ? weight_unmerged_ : w;
  std::vector<at::Tensor> as, bs;
  std::vector<double> scales;
  for (const auto& name : everything) {
    as.push_back(lora_a(name));
    bs.push_back(lora_b(name));
    scales.push_back(table_.options(name).scale());
  }
  const at::Tensor merged_weight = lorafuse::lora_merge(original, as, bs, scales);  // checks finiteness
  if (!merged()) weight_unmerged_.set_data(w.clone());
  w.copy_(merged_weight);
  table_.set_merged(everything);
}

void LoraLinearImpl::drop_unmerged_copy() {
  weight_unmerged_.set_data(at::empty({0}, base_layer->weight.options()));
  table_.set_merged({});
}

void LoraLinearImpl::unmerge() {
  table_.check_unmerge();
  torch::NoGradGuard no_grad;
  base_layer->weight.copy_(weight_unmerged_);
  drop_unmerged_copy();
}

torch::nn::Linear LoraLinearImpl::merge_and_unload() {
  const auto everything = table_.plan_unload();
  if (!everything.empty()) merge_into_base(everything);
  if (merged()) drop_unmerged_copy();
  while (!table_.names().empty()) delete_adapter(table_.names().back());
  return base_layer;
}

void LoraLinearImpl::pretty_print(std::ostream& stream) const {
  stream << "lorafuse::nn::LoraLinear(in_features=" << options.in_features()
         << ", out_features=" << options.out_features() << ", bias=" << (base_layer->bias.defined() ? "true" : "false")
         << ", " << table_.describe() << ")";
}

}  // namespace lorafuse::nn
