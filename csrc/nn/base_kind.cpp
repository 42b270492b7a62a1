#include <lorafuse/nn/base_kind.h>
#include <lorafuse/nn/linear4bit.h>
#include <lorafuse/nn/lora_attention.h>
#include <lorafuse/nn/lora_embedding.h>
#include <lorafuse/nn/lora_layer.h>
#include <lorafuse/nn/lora_linear.h>
#include <lorafuse/nn/lora_linear4bit.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>

#include <typeinfo>

namespace lorafuse::nn {
namespace {

// Exactly torch::nn::LinearImpl: the fused lora_linear op computes what its forward computes.
class DenseLinearKind final : public BaseKind {
 public:
  const char* name() const noexcept override { return "linear"; }
  bool matches(const torch::nn::Module& module) const override {
    return typeid(module) == typeid(torch::nn::LinearImpl);
  }
  int64_t in_features(const torch::nn::Module& module) const override { return linear(module).options.in_features(); }
  int64_t out_features(const torch::nn::Module& module) const override { return linear(module).options.out_features(); }
  c10::ScalarType compute_dtype(const torch::nn::Module& module) const override {
    return linear(module).weight.scalar_type();
  }
  at::Tensor forward(torch::nn::Module& module, const at::Tensor& x) const override {
    return static_cast<torch::nn::LinearImpl&>(module).forward(x);
  }
  std::shared_ptr<torch::nn::Module> shallow_copy(const torch::nn::Module& module) const override {
    return std::make_shared<torch::nn::LinearImpl>(linear(module));
  }
  std::shared_ptr<torch::nn::Module> wrap(const std::shared_ptr<torch::nn::Module>& module,
                                          const LoraAdapterOptions& adapter,
                                          const std::string& adapter_name) const override {
    torch::nn::Linear base(std::static_pointer_cast<torch::nn::LinearImpl>(module));
    return std::make_shared<LoraLinearImpl>(base, adapter, adapter_name);
  }

 private:
  static const torch::nn::LinearImpl& linear(const torch::nn::Module& module) {
    return static_cast<const torch::nn::LinearImpl&>(module);
  }
};

// Exactly lorafuse::nn::Linear4bit: QLoRA's NF4 base, computed by lorafuse::linear4bit; LoraLinear4bit wraps it.
class Nf4LinearKind final : public BaseKind {
 public:
  const char* name() const noexcept override { return "linear4bit"; }
  bool matches(const torch::nn::Module& module) const override { return typeid(module) == typeid(Linear4bitImpl); }
  int64_t in_features(const torch::nn::Module& module) const override { return layer(module).options.in_features(); }
  int64_t out_features(const torch::nn::Module& module) const override { return layer(module).options.out_features(); }
  c10::ScalarType compute_dtype(const torch::nn::Module& module) const override {
    return layer(module).options.compute_dtype();
  }
  at::Tensor forward(torch::nn::Module& module, const at::Tensor& x) const override {
    return static_cast<Linear4bitImpl&>(module).forward(x);
  }
  std::shared_ptr<torch::nn::Module> shallow_copy(const torch::nn::Module& module) const override {
    return std::make_shared<Linear4bitImpl>(layer(module));
  }
  std::shared_ptr<torch::nn::Module> wrap(const std::shared_ptr<torch::nn::Module>& module,
                                          const LoraAdapterOptions& adapter,
                                          const std::string& adapter_name) const override {
    return std::make_shared<LoraLinear4bitImpl>(Linear4bit(std::static_pointer_cast<Linear4bitImpl>(module)), adapter,
                                                adapter_name);
  }

 private:
  static const Linear4bitImpl& layer(const torch::nn::Module& module) {
    return static_cast<const Linear4bitImpl&>(module);
  }
};

// Exactly torch::nn::EmbeddingImpl (no max_norm: its lookups renormalise rows in place): LoraEmbedding wraps it.
class EmbeddingKind final : public BaseKind {
 public:
  const char* name() const noexcept override { return "embedding"; }
  bool embedding() const noexcept override { return true; }
  bool matches(const torch::nn::Module& module) const override {
    return typeid(module) == typeid(torch::nn::EmbeddingImpl) && !layer(module).options.max_norm().has_value();
  }
  int64_t in_features(const torch::nn::Module& module) const override { return layer(module).options.num_embeddings(); }
  int64_t out_features(const torch::nn::Module& module) const override { return layer(module).options.embedding_dim(); }
  c10::ScalarType compute_dtype(const torch::nn::Module& module) const override {
    return layer(module).weight.scalar_type();
  }
  at::Tensor forward(torch::nn::Module& module, const at::Tensor& x) const override {
    return static_cast<torch::nn::EmbeddingImpl&>(module).forward(x);
  }
  std::shared_ptr<torch::nn::Module> shallow_copy(const torch::nn::Module& module) const override {
    return std::make_shared<torch::nn::EmbeddingImpl>(layer(module));
  }
  std::shared_ptr<torch::nn::Module> wrap(const std::shared_ptr<torch::nn::Module>& module,
                                          const LoraAdapterOptions& adapter,
                                          const std::string& adapter_name) const override {
    torch::nn::Embedding base(std::static_pointer_cast<torch::nn::EmbeddingImpl>(module));
    return std::make_shared<LoraEmbeddingImpl>(base, adapter, adapter_name);
  }

 private:
  static const torch::nn::EmbeddingImpl& layer(const torch::nn::Module& module) {
    return static_cast<const torch::nn::EmbeddingImpl&>(module);
  }
};

// Exactly torch::nn::MultiheadAttentionImpl (PEFT's lora.MultiheadAttention): LoraMultiheadAttention wraps it; in and
// out are embed_dim and 3·embed_dim (its packed in_proj_weight).
class MultiheadAttentionKind final : public BaseKind {
 public:
  const char* name() const noexcept override { return "multihead_attention"; }
  bool attention() const noexcept override { return true; }
  bool matches(const torch::nn::Module& module) const override {
    return typeid(module) == typeid(torch::nn::MultiheadAttentionImpl);
  }
  int64_t in_features(const torch::nn::Module& module) const override { return layer(module).options.embed_dim(); }
  int64_t out_features(const torch::nn::Module& module) const override { return 3 * layer(module).options.embed_dim(); }
  c10::ScalarType compute_dtype(const torch::nn::Module& module) const override {
    return layer(module).in_proj_weight.scalar_type();
  }
  at::Tensor forward(torch::nn::Module& module, const at::Tensor& /*x*/) const override {
    TORCH_CHECK_VALUE(false, module.name(),
                      ": an attention takes query, key and value; hold it in a lorafuse::nn::AttentionSlot");
  }
  std::shared_ptr<torch::nn::Module> shallow_copy(const torch::nn::Module& module) const override {
    return std::make_shared<torch::nn::MultiheadAttentionImpl>(layer(module));
  }
  std::shared_ptr<torch::nn::Module> wrap(const std::shared_ptr<torch::nn::Module>& module,
                                          const LoraAdapterOptions& adapter,
                                          const std::string& adapter_name) const override {
    torch::nn::MultiheadAttention base(std::static_pointer_cast<torch::nn::MultiheadAttentionImpl>(module));
    return std::make_shared<LoraMultiheadAttentionImpl>(base, adapter, adapter_name);
  }

 private:
  static const torch::nn::MultiheadAttentionImpl& layer(const torch::nn::Module& module) {
    return static_cast<const torch::nn::MultiheadAttentionImpl&>(module);
  }
};

}  // namespace

const std::vector<const BaseKind*>& base_kinds() {
  static const DenseLinearKind dense;
  static const Nf4LinearKind nf4;
  static const EmbeddingKind embedding;
  static const MultiheadAttentionKind attention;
  static const std::vector<const BaseKind*> kinds = {&dense, &nf4, &embedding, &attention};
  return kinds;
}

const BaseKind* base_kind_of(const torch::nn::Module& module) {
  for (const BaseKind* kind : base_kinds()) {
    if (kind->matches(module)) return kind;
  }
  return nullptr;
}

LoraLayer* as_lora_layer(torch::nn::Module* module) { return dynamic_cast<LoraLayer*>(module); }
const LoraLayer* as_lora_layer(const torch::nn::Module* module) { return dynamic_cast<const LoraLayer*>(module); }

}  // namespace lorafuse::nn
