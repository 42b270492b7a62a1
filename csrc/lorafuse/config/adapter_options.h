// One LoRA adapter's hyperparameters, with PEFT's names.
#pragma once

#include <c10/core/ScalarType.h>
#include <torch/arg.h>

#include <cstdint>
#include <optional>
#include <string>

namespace lorafuse::nn {

/// How a new adapter's weights start (PEFT's init_lora_weights):
///   true        A kaiming-uniform (a = √5), B zeros: the adapter starts as a no-op (the default);
///   "gaussian"  A normal(0, 1/r), B zeros;
///   false       A and B both kaiming-uniform (a = √5): a random, non-zero adapter (for tests);
///   "loftq"     LoftQ (Li et al., 2023): the layer's full-precision weight W is replaced by its quantized value Q
///               and the adapter starts at the best rank-r approximation of W − Q (LoftqConfig: the bits and the
///               alternating iterations), so that the quantized layer plus its adapter starts close to W. Only a new
///               adapter over a dense Linear can start so (lorafuse::loftq_init, the op torch.ops.lorafuse.loftq_init);
///   "pissa"     PiSSA (Meng et al., 2024): A and B start at W's r principal singular directions (exact SVD, float32),
///               and W keeps the residual W − scale·B·A, as PEFT computes it;
///   "pissa_niter_N"  PiSSA by a randomized SVD with N subspace iterations (Halko et al.; torch.svd_lowrank's
///               algorithm and random draws from the default generator, as PEFT): faster on large weights;
///   "olora"     OLoRA (Büyükakyüz, 2024): B = Q[:, :r], A = R[:r] of W's QR decomposition, and W keeps W − scale·B·A.
/// The last three change the base weight: only a new adapter over a dense Linear starts so. An adapter loaded from a
/// file takes its weights (the initialisation ran when it was made).
class InitLoraWeights {
 public:
  enum class Kind { kDefault, kGaussian, kRandom, kLoftq, kPissa, kPissaNiter, kOlora };
  InitLoraWeights(bool init = true) : kind_(init ? Kind::kDefault : Kind::kRandom) {}  // NOLINT
  /// "gaussian", "loftq", "pissa", "pissa_niter_N" (N ≥ 0 digits), "olora", "true" or "false"; anything else is a
  /// ValueError naming init_lora_weights.
  InitLoraWeights(const std::string& init);                                  // NOLINT
  InitLoraWeights(const char* init) : InitLoraWeights(std::string(init)) {}  // NOLINT
  Kind kind() const noexcept { return kind_; }
  /// Whether it changes the base weight (loftq, pissa, olora): then the layer's dense weight is needed.
  bool changes_base() const noexcept {
    return kind_ == Kind::kLoftq || kind_ == Kind::kPissa || kind_ == Kind::kPissaNiter || kind_ == Kind::kOlora;
  }
  /// pissa_niter_N's N (0 for the other kinds).
  int64_t niter() const noexcept { return niter_; }
  /// "true", "gaussian", "loftq", "pissa", "pissa_niter_N", "olora" or "false", as PEFT's adapter_config.json writes
  /// it.
  std::string str() const;
  bool operator==(const InitLoraWeights& other) const noexcept {
    return kind_ == other.kind_ && niter_ == other.niter_;
  }

 private:
  Kind kind_;
  int64_t niter_ = 0;
};

/// PEFT's LoftQConfig: how init_lora_weights = "loftq" quantizes the base weight.
struct LoftqConfig {
  /// Bits of the NF code, 2 .. 8, in absmax blocks of 64 with float32 statistics: at 4 bits bitsandbytes' NF4 without
  /// double quantization, what PEFT's LoftQ uses. (PEFT's 8 is bitsandbytes' int8 row-wise code; lorafuse's 8 is NF8.)
  TORCH_ARG(int64_t, loftq_bits) = 4;
  /// Alternating iterations (quantize, then the rank-r SVD of what is left), >= 1.
  TORCH_ARG(int64_t, loftq_iter) = 1;

 public:
  bool operator==(const LoftqConfig& o) const { return loftq_bits_ == o.loftq_bits_ && loftq_iter_ == o.loftq_iter_; }
  /// ValueError naming loftq_config's field unless valid.
  void validate() const;
};

/// The options of one adapter of a LoraLinear.
struct LoraAdapterOptions {
  explicit LoraAdapterOptions(int64_t r = 8) : r_(r) {}
  /// Rank: lora_A is [r, in], lora_B [out, r]. Must be > 0.
  TORCH_ARG(int64_t, r);
  /// scale = lora_alpha / r (lora_alpha / √r with use_rslora). Must be > 0.
  TORCH_ARG(double, lora_alpha) = 8.0;
  /// Dropout on the LoRA branch's input while training, in [0, 1).
  TORCH_ARG(double, lora_dropout) = 0.0;
  /// Rank-stabilised scaling: lora_alpha / √r.
  TORCH_ARG(bool, use_rslora) = false;
  /// How A and B start.
  TORCH_ARG(InitLoraWeights, init_lora_weights) = true;
  /// With init_lora_weights = "loftq": its settings.
  TORCH_ARG(LoftqConfig, loftq_config);
  /// dtype of lora_A and lora_B: the base weight's dtype or float32; none: float32 for a
  /// float16/bfloat16 base (as PEFT keeps adapters in float32), else the base weight's dtype.
  TORCH_ARG(std::optional<c10::ScalarType>, dtype) = std::nullopt;
  /// Which biases train while this adapter is active: "none", "all" or "lora_only" (LoraConfig::bias,
  /// recorded with the adapter because PEFT applies the active adapter's mode).
  TORCH_ARG(std::string, bias) = "none";
  /// PEFT's task type of the adapter's config (LoraConfig::task_type; "" for none), recorded with the adapter so that
  /// its file says it again. It changes nothing lorafuse computes.
  TORCH_ARG(std::string, task_type);
  /// DoRA (PEFT's use_dora; Liu et al., 2024): the adapter also has a magnitude vector m [out], started at the row
  /// norms of W + scale·B·A, and the layer computes m / ‖W + scale·B·A‖ ⊙ (x·Wᵀ + scale·(x·Aᵀ)·Bᵀ) + b
  /// (lorafuse::dora_linear). Only over a base with a full-precision weight (a dense Linear, a Conv1D).
  TORCH_ARG(bool, use_dora) = false;

 public:
  /// lora_alpha / r, or lora_alpha / √r with use_rslora.
  double scale() const;
  /// ValueError naming the first bad field, with what was found and what is expected.
  void validate() const;
};

/// The options as a JSON object with PEFT's names (r, lora_alpha, lora_dropout, use_rslora, init_lora_weights as
/// true/false/"gaussian", bias) plus dtype ("Float", ... or null): the one mapping, used by module archives and
/// the Python front.
std::string adapter_options_json(const LoraAdapterOptions& options);
/// The inverse, validated; ValueErrors are prefixed with `what`.
LoraAdapterOptions adapter_options_from_json(const std::string& json_text, const std::string& what);

/// A ValueError unless `task_type` is "" (none) or one of PEFT's LoRA task types: "CAUSAL_LM", "SEQ_2_SEQ_LM",
/// "FEATURE_EXTRACTION", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS" (the last three also train and save the model's task
/// head: lorafuse::task_heads).
void check_task_type(const std::string& task_type);

/// Throws a ValueError unless `name` can name an adapter: non-empty, without '.', whitespace or
/// control characters (it becomes part of module paths: `q_proj.lora_A.<name>.weight`).
void check_adapter_name(const std::string& name);

}  // namespace lorafuse::nn
