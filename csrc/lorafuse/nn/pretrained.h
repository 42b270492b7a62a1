// What a model says about itself for PEFT's model-wide rules (Hugging Face's config.model_type and
// get_output_embeddings()): which default target_modules apply and which Linear layer "all-linear" leaves out.
#pragma once

#include <string>

namespace lorafuse::nn {

/// Implemented by a model's root module (the reference Llama does). A model that does not implement it has no model
/// type (target_modules must be given) and no output layer (as PEFT treats a model that is not a transformers one).
class PretrainedModel {
 public:
  virtual ~PretrainedModel() = default;
  /// transformers' model_type ("llama", "gpt2", ...): lorafuse::default_target_modules looks it up.
  virtual std::string model_type() const = 0;
  /// The path of the layer that computes the output logits (the output embeddings, "lm_head"), or "" when none.
  virtual std::string output_layer() const = 0;
};

}  // namespace lorafuse::nn
