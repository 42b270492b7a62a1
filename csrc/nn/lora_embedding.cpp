#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <lorafuse/nn/adapter_scope.h>
#include <lorafuse/nn/linear.h>
#include <lorafuse/nn/lora_embedding.h>
#include <lorafuse/ops/lora_embedding.h>
#include <lorafuse/ops/merge.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/serialize/archive.h>

namespace lorafuse::nn {

LoraEmbeddingImpl::LoraEmbeddingImpl(torch::nn::Embedding base, const LoraAdapterOptions& adapter,
                                     const std::string& adapter_name) {
  TORCH_CHECK_VALUE(!base.is_empty(), "base: expected a torch::nn::Embedding, found an empty holder");
  TORCH_CHECK_VALUE(!base->options.max_norm().has_value(),
                    "base: an Embedding with max_norm renormalises its rows in place on every lookup, which a LoRA "
                    "branch cannot follow; lorafuse takes embeddings without max_norm");
  check_adapter_name(adapter_name);
  adapters_.table().check_add(adapter_name, adapter, base->weight.scalar_type());
  pending_base_ = std::move(base);
  reset();
  add_adapter(adapter_name, adapter);
}

void LoraEmbeddingImpl::reset() {
  torch::nn::Embedding base = std::move(pending_base_);
  pending_base_ = nullptr;
  const bool wrapping = !base.is_empty();
  if (!wrapping) {  // Cloneable::clone: a placeholder sharing the original's base, then overwritten by its deep copy
    TORCH_CHECK(!base_layer.is_empty(), "LoraEmbedding::reset: no base layer to wrap");
    base = torch::nn::Embedding(std::make_shared<torch::nn::EmbeddingImpl>(*base_layer));
  }
  base_layer = register_module("base_layer", base);
  if (wrapping) base_layer->weight.set_requires_grad(false);
  adapters_.reset(*this, in_features(), out_features(), base_options(), /*dense_weight=*/{}, /*embedding=*/true);
  weight_unmerged_ = register_buffer("weight_unmerged", at::empty({0}, base_layer->weight.options()));
}

void LoraEmbeddingImpl::reset_parameters() { adapters_.reset_parameters(); }

std::shared_ptr<torch::nn::Module> LoraEmbeddingImpl::clone(const std::optional<torch::Device>& device) const {
  check_cloneable(*this, "LoraEmbedding::clone");
  auto copy = torch::nn::Cloneable<LoraEmbeddingImpl>::clone(device);
  copy_requires_grad(*this, *copy);
  std::dynamic_pointer_cast<LoraEmbeddingImpl>(copy)->adapters_.refresh_routes();
  return copy;
}

at::Tensor LoraEmbeddingImpl::forward(const at::Tensor& indices) {
  if (const auto rows = AdapterScope::rows()) {
    // rows as RowAdapters counts them: the indices' first dimension; one adapter for every row runs the plain path
    auto sizes = indices.sizes().vec();
    sizes.push_back(out_features());
    const auto plan = rows->plan(adapters_.table(), adapters_.routed_names(), sizes, indices.device());
    if (plan.adapters.empty()) return base_layer->forward(indices);
    TORCH_CHECK_VALUE(plan.uniform, "use_adapter: an embedding layer's adapters (", AdapterTable::join(plan.adapters),
                      ") in a batch with one adapter per row are not supported yet; run each adapter's rows in a "
                      "batch of their own");
    const auto route = adapters_.route_of(plan.adapters.front());
    return route ? routed_forward(indices, *route) : base_layer->forward(indices);
  }
  const auto route = adapters_.route();
  if (!route) return base_layer->forward(indices);
  return routed_forward(indices, *route);
}

at::Tensor LoraEmbeddingImpl::routed_forward(const at::Tensor& indices, const LoraAdapters::Route& route) {
  const auto& o = base_layer->options;
  return lorafuse::lora_embedding(base_layer->forward(indices), indices, route.a->weight, route.b->weight, route.scale,
                                  o.padding_idx().value_or(-1), o.scale_grad_by_freq(), o.sparse());
}

void LoraEmbeddingImpl::add_adapter(const std::string& name, const LoraAdapterOptions& adapter, bool activate) {
  adapters_.add(*this, name, adapter, activate, base_options());
}

void LoraEmbeddingImpl::set_adapter(const std::string& name) {
  adapters_.activate(name, [this] { unmerge(); });
}

void LoraEmbeddingImpl::clear_active_adapter() {
  adapters_.clear_active([this] { unmerge(); });
}

void LoraEmbeddingImpl::delete_adapter(const std::string& name) { adapters_.remove(name); }

void LoraEmbeddingImpl::disable_adapters() {
  adapters_.disable([this] { unmerge(); });
}

void LoraEmbeddingImpl::enable_adapters() { adapters_.enable(); }

void LoraEmbeddingImpl::merge(const std::vector<std::string>& adapter_names, bool /*requantize*/) {
  const auto everything = adapters_.table().plan_merge(adapter_names);
  if (everything == adapters_.table().merged()) return;  // merged already (plan_merge warned)
  merge_into_base(everything);
}

void LoraEmbeddingImpl::merge_into_base(const std::vector<std::string>& everything) {
  // the [out, in] weight that merges change is the embedding matrix [num, dim] transposed
  adapters_.merge_dense(base_layer->weight, /*transposed=*/true, weight_unmerged_, everything);
}

void LoraEmbeddingImpl::unmerge() { adapters_.unmerge_dense(base_layer->weight, weight_unmerged_); }

torch::nn::Embedding LoraEmbeddingImpl::merge_and_unload() {
  adapters_.unload_dense(base_layer->weight, /*transposed=*/true, weight_unmerged_);
  return base_layer;
}

void LoraEmbeddingImpl::pretty_print(std::ostream& stream) const {
  stream << "lorafuse::nn::LoraEmbedding(num_embeddings=" << in_features() << ", embedding_dim=" << out_features()
         << ", " << adapters().describe() << ")";
}

void LoraEmbeddingImpl::save(torch::serialize::OutputArchive& archive) const {
  torch::nn::Module::save(archive);
  adapters_.save(archive);
}

void LoraEmbeddingImpl::load(torch::serialize::InputArchive& archive) {
  adapters_.load(archive, *this, base_options(), "LoraEmbedding::load");
  torch::nn::Module::load(archive);
}

}  // namespace lorafuse::nn
