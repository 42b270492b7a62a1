// lorafuse::nn::BaseKind — the one list of base layers that LoRA can wrap (as PEFT's dispatcher list). Each
// kind says whether it takes a module, its shape, how to call it, and which LoRA layer wraps it. Selection
// (inject_lora, adapter files), injection and LinearSlot ask this list and nothing else.
//
// Kinds today: "linear" — exactly torch::nn::LinearImpl, computed by the fused lora_linear op; "linear4bit" — exactly
// lorafuse::nn::Linear4bit (QLoRA's NF4 base), wrapped by LoraLinear4bit; "embedding" — exactly
// torch::nn::EmbeddingImpl without max_norm, wrapped by LoraEmbedding; "multihead_attention" — exactly
// torch::nn::MultiheadAttentionImpl, wrapped by LoraMultiheadAttention. A subclass of
// LinearImpl is not taken: LibTorch's forward is not virtual, so a wrapper could not call the subclass's own
// forward, and computing W·x instead would silently change the model (selecting one is a clear error).
#pragma once

#include <ATen/core/Tensor.h>
#include <lorafuse/config/adapter_options.h>
#include <torch/nn/module.h>

#include <memory>
#include <string>
#include <vector>

namespace lorafuse::nn {

class BaseKind {
 public:
  virtual ~BaseKind() = default;
  /// A short name for messages ("linear").
  virtual const char* name() const noexcept = 0;
  /// An embedding layer (in, out = num_embeddings, embedding_dim): selected only when named, its adapters' tensors
  /// named lora_embedding_A / _B in files.
  virtual bool embedding() const noexcept { return false; }
  /// A multi-head attention (in, out = embed_dim, 3·embed_dim: its packed q/k/v projection): selected only when named,
  /// wrapped by LoraMultiheadAttention, held by an AttentionSlot; forward() is not how it is called.
  virtual bool attention() const noexcept { return false; }
  /// Whether this kind takes `module`.
  virtual bool matches(const torch::nn::Module& module) const = 0;
  virtual int64_t in_features(const torch::nn::Module& module) const = 0;
  virtual int64_t out_features(const torch::nn::Module& module) const = 0;
  /// The dtype the base computes in (its weight's, or a quantized base's compute dtype).
  virtual c10::ScalarType compute_dtype(const torch::nn::Module& module) const = 0;
  /// Calls `module` (a module this kind matches).
  virtual at::Tensor forward(torch::nn::Module& module, const at::Tensor& x) const = 0;
  /// A copy of `module` sharing its tensors (no allocation): the placeholder of a cloned owner.
  virtual std::shared_ptr<torch::nn::Module> shallow_copy(const torch::nn::Module& module) const = 0;
  /// A new LoRA layer over `module` (shared, frozen) with adapter `adapter_name`.
  virtual std::shared_ptr<torch::nn::Module> wrap(const std::shared_ptr<torch::nn::Module>& module,
                                                  const LoraAdapterOptions& adapter,
                                                  const std::string& adapter_name) const = 0;
};

/// The kinds, in the order they are asked (the first match wins).
const std::vector<const BaseKind*>& base_kinds();
/// The kind that takes `module`, or nullptr.
const BaseKind* base_kind_of(const torch::nn::Module& module);

}  // namespace lorafuse::nn
