// The one TORCH_LIBRARY(lorafuse, m): every schema of the project, each with a one-line comment.
#include <torch/library.h>

TORCH_LIBRARY(lorafuse, m) {
  // y = x·Wᵀ + b + scale·(dropout(x)·Aᵀ)·Bᵀ; differentiable in x, bias, lora_a, lora_b (not weight).
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale, "
      "float dropout_p=0.0) -> Tensor",
      {at::Tag::nondeterministic_seeded});
  // Training forward: also returns u = dropout(x)·Aᵀ [T, r] and the dropout rng_state [2] for backward.
  m.def(
      "lora_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale, "
      "float dropout_p) -> (Tensor out, Tensor u, Tensor rng_state)",
      {at::Tag::nondeterministic_seeded});
  // Backward of lora_linear; output_mask = (x, lora_a, lora_b, bias); unrequested grads are empty [0].
  m.def(
      "lora_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor u, "
      "Tensor rng_state, float scale, float dropout_p, bool[4] output_mask) "
      "-> (Tensor grad_x, Tensor grad_lora_a, Tensor grad_lora_b, Tensor grad_bias)");
}
