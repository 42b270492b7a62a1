// lorafuse::nn::LoraEmbedding — a frozen torch::nn::Embedding with named LoRA adapters (PEFT's lora.Embedding).
#pragma once

#include <lorafuse/config/adapter_options.h>
#include <lorafuse/nn/lora_adapters.h>
#include <lorafuse/nn/lora_layer.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace lorafuse::nn {

/// y = E[x] + scale · Aᵀ[x] · Bᵀ for the active adapter, through lorafuse::lora_embedding.
///
/// Wraps a frozen base torch::nn::Embedding (registered as `base_layer`, sharing its weight) with named adapters:
/// `lora_embedding_A.<name>.weight` [r, num_embeddings] and `lora_embedding_B.<name>.weight` [embedding_dim, r]
/// (Python's lorafuse.nn.Embedding and PEFT keep bare parameters, `lora_embedding_A.<name>`; adapter files use PEFT's
/// names), started as PEFT starts an embedding's (A zeros, B normal(0, 1); both normal with init_lora_weights false).
/// The same rules as LoraLinear: one active adapter, disable/enable, merge into the embedding matrix with an exact
/// unmerge, archives. As in PEFT, lora_dropout does not act on an embedding's branch. Not with DoRA or
/// LoftQ/PiSSA/OLoRA (refused by name), nor with different adapters per row of a batch.
class LoraEmbeddingImpl : public torch::nn::Cloneable<LoraEmbeddingImpl>, public LoraLayer {
 public:
  /// Wraps `base` (not copied: the layer shares its weight and freezes it) with one adapter.
  LoraEmbeddingImpl(torch::nn::Embedding base, const LoraAdapterOptions& adapter,
                    const std::string& adapter_name = "default");

  void reset() override;
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;
  std::shared_ptr<torch::nn::Module> clone(const std::optional<torch::Device>& device = std::nullopt) const override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

  /// Integer indices [...] → [..., embedding_dim].
  at::Tensor forward(const at::Tensor& indices);

  void add_adapter(const std::string& name, const LoraAdapterOptions& options, bool activate = true) override;
  void set_adapter(const std::string& name) override;
  void clear_active_adapter() override;
  void delete_adapter(const std::string& name) override;
  void disable_adapters() override;
  void enable_adapters() override;
  const AdapterTable& adapters() const noexcept override { return adapters_.table(); }
  at::Tensor& lora_a(const std::string& name) override { return adapters_.lora_a(name); }
  at::Tensor& lora_b(const std::string& name) override { return adapters_.lora_b(name); }
  at::Tensor& lora_magnitude(const std::string& name) override { return adapters_.lora_magnitude(name); }

  /// Folds scale·(B·A)ᵀ of the named adapters (default: the active one) into the embedding matrix (lora_merge, float32,
  /// from the unmerged weight, which is kept for an exact unmerge). `requantize` is ignored.
  void merge(const std::vector<std::string>& adapter_names = {}, bool requantize = false) override;
  void unmerge() override;
  /// Merges the active adapter for good and returns the base Embedding.
  torch::nn::Embedding merge_and_unload();

  torch::nn::Module& module() override { return *this; }
  at::Tensor lora_forward(const at::Tensor& x) override { return forward(x); }
  int64_t in_features() const override { return base_layer->options.num_embeddings(); }
  int64_t out_features() const override { return base_layer->options.embedding_dim(); }
  at::Tensor base_bias() const override { return {}; }
  std::shared_ptr<torch::nn::Module> unload_merged() override { return merge_and_unload().ptr(); }
  std::shared_ptr<torch::nn::Module> base_module() const override { return base_layer.ptr(); }
  std::shared_ptr<torch::nn::Module> shallow_copy() const override {
    return std::make_shared<LoraEmbeddingImpl>(*this);
  }

  torch::nn::Embedding base_layer{nullptr};

 private:
  at::TensorOptions base_options() const { return base_layer->weight.options(); }
  at::Tensor routed_forward(const at::Tensor& indices, const LoraAdapters::Route& route);
  void merge_into_base(const std::vector<std::string>& everything);

  torch::nn::Embedding pending_base_{nullptr};  // consumed by the first reset() of the constructor
  LoraAdapters adapters_;
  at::Tensor weight_unmerged_;  // buffer: the unmerged embedding matrix while anything is merged, else [0]
};

TORCH_MODULE(LoraEmbedding);

}  // namespace lorafuse::nn
