// lorafuse::LoraConfig — which layers get LoRA and how, with PEFT's names and meanings.
#pragma once

#include <lorafuse/config/adapter_options.h>
#include <torch/arg.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

namespace lorafuse {

/// Which modules a config selects:
///   not given         the defaults for the model's type (default_target_modules; PEFT's table), an error for a model
///                     of no known type;
///   a list of names   a module matches when its path equals an entry or ends with "." + entry
///                     ({"q_proj", "v_proj"} selects model.layers.N.self_attn.q_proj and .v_proj);
///   a string          a regular expression that the whole module path must match (Python's re.fullmatch; the
///                     syntax of Python's re as PEFT users write it — (?i), lookarounds, (?P<name>...) — by PCRE2);
///   "all-linear"      every Linear layer except the model's output layer (nn::PretrainedModel::output_layer, Hugging
///                     Face's get_output_embeddings()), as PEFT does.
class TargetModules {
 public:
  TargetModules() = default;
  TargetModules(std::vector<std::string> names) : names_(std::move(names)) {}  // NOLINT
  TargetModules(std::initializer_list<std::string> names) : names_(names) {}
  TargetModules(std::string regex) : regex_(std::move(regex)), is_regex_(true) {}  // NOLINT
  TargetModules(const char* regex) : TargetModules(std::string(regex)) {}          // NOLINT

  /// Not given (a default-constructed TargetModules): the model type's defaults apply.
  bool empty() const noexcept { return !is_regex_ && names_.empty(); }
  bool is_regex() const noexcept { return is_regex_ && !is_all_linear(); }
  /// Given as a string: a regular expression or "all-linear".
  bool is_regex_or_all_linear() const noexcept { return is_regex_; }
  /// "all-linear" in any case, as PEFT accepts it.
  bool is_all_linear() const noexcept;
  const std::vector<std::string>& names() const noexcept { return names_; }
  const std::string& regex() const noexcept { return regex_; }
  /// Whether module `path` is selected ("all-linear" selects every path; select_targets leaves the output layer out).
  bool matches(const std::string& path) const;
  /// Whether `path` is selected by list entry `name`.
  static bool matches_name(const std::string& path, const std::string& name);
  /// {"q_proj", "v_proj"} or "regex", as written.
  std::string str() const;

 private:
  std::vector<std::string> names_;
  std::string regex_;
  bool is_regex_ = false;
};

/// Ordered (pattern, value) overrides: the first pattern P with the module path matching
/// `(.*\.)?(P)` (PEFT's rank_pattern / alpha_pattern rule) gives the value.
template <typename T>
using PatternMap = std::vector<std::pair<std::string, T>>;

/// The LoRA configuration of one adapter, as PEFT's LoraConfig.
struct LoraConfig {
  /// Rank of every adapter (unless rank_pattern overrides it). Must be > 0.
  TORCH_ARG(int64_t, r) = 8;
  /// scale = lora_alpha / r (lora_alpha / √r with use_rslora). Must be > 0.
  TORCH_ARG(double, lora_alpha) = 8.0;
  /// Dropout on the LoRA branch while training, in [0, 1).
  TORCH_ARG(double, lora_dropout) = 0.0;
  /// Which Linear layers get the adapter; not given: the defaults for the model's type (default_target_modules).
  TORCH_ARG(TargetModules, target_modules);
  /// Layers to leave alone even if target_modules selects them (same forms as target_modules).
  TORCH_ARG(TargetModules, exclude_modules);
  /// PEFT's layers_to_transform: with target_modules a list of names, only modules inside these layer indices get the
  /// adapter (empty: every layer). A module's layer index is the first number in its path after a layers_pattern
  /// entry ("model.layers.3.self_attn.q_proj" → 3 for "layers"), or without a pattern the first number that follows
  /// two path components. A path equal to a target entry is selected whatever its layer.
  TORCH_ARG(std::vector<int64_t>, layers_to_transform);
  /// PEFT's layers_pattern: the names of the module lists that hold the layers ("layers", "h", ...; each a regular
  /// expression, inserted into PEFT's as it is); only with layers_to_transform.
  TORCH_ARG(std::vector<std::string>, layers_pattern);
  /// Which biases train: "none", "all" (every bias of the model) or "lora_only" (the biases of the layers
  /// that get adapters).
  TORCH_ARG(std::string, bias) = "none";
  /// Rank-stabilised scaling lora_alpha / √r.
  TORCH_ARG(bool, use_rslora) = false;
  /// Per-module ranks, e.g. {{"down_proj", 16}}.
  TORCH_ARG(PatternMap<int64_t>, rank_pattern);
  /// Per-module lora_alpha, e.g. {{"down_proj", 32.0}}.
  TORCH_ARG(PatternMap<double>, alpha_pattern);
  /// How new A and B start (true, "gaussian", "loftq" or false).
  TORCH_ARG(nn::InitLoraWeights, init_lora_weights) = true;
  /// With init_lora_weights = "loftq": how LoftQ quantizes (PEFT's loftq_config).
  TORCH_ARG(nn::LoftqConfig, loftq_config);
  /// PEFT's flag for weights stored [in, out] (transformers' Conv1D, GPT-2). As in PEFT, each layer's kind decides
  /// (a Conv1D base computes transposed, a Linear does not); the flag is carried to and from adapter_config.json, where
  /// an adapter over Conv1D layers has it set.
  TORCH_ARG(bool, fan_in_fan_out) = false;
  /// PEFT's task type: "" (none), "CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION", "SEQ_CLS", "TOKEN_CLS" or
  /// "QUESTION_ANS"; written to adapter_config.json and read from it. As PEFT's task models do, "SEQ_CLS" and
  /// "TOKEN_CLS" add the task heads "classifier" and "score" to modules_to_save, "QUESTION_ANS" adds "qa_outputs"; the
  /// others change nothing lorafuse computes.
  TORCH_ARG(std::string, task_type);
  /// PEFT's modules_to_save: modules (besides the LoRA layers) that train whole with this adapter and are saved with
  /// it, such as a classification head. A module whose path ends with an entry (PEFT's rule, a plain string suffix:
  /// "classifier" takes "classifier" and "model.classifier") is wrapped in a modules-to-save layer holding the original
  /// (frozen) and one trainable copy per adapter; LoRA targets inside it are left out. See saved_modules().
  TORCH_ARG(std::vector<std::string>, modules_to_save);
  /// DoRA for every adapter of this config (PEFT's use_dora; nn::LoraAdapterOptions::use_dora says what it computes).
  TORCH_ARG(bool, use_dora) = false;

 public:
  /// ValueError naming the first bad field, what was found and what is expected.
  void validate() const;
  /// The adapter options for the module at `path` (rank_pattern and alpha_pattern applied).
  nn::LoraAdapterOptions adapter_for(const std::string& path) const;
  /// Whether target_modules (as given) and layers_to_transform select the module at `path` (exclude_modules apart).
  bool selects(const std::string& path) const;
  /// Whether layers_to_transform lets `targets` select the module at `path` (true when it is empty).
  bool in_transformed_layers(const TargetModules& targets, const std::string& path) const;
  /// modules_to_save with the task type's heads added (task_heads), each name once, in that order.
  std::vector<std::string> saved_modules() const;
  /// Whether the module at `path` is one that saved_modules() wraps: its path ends with an entry (PEFT's rule).
  bool saves_module(const std::string& path) const;
  /// Whether the module at `path` is, or is inside, a module that saved_modules() names (PEFT's rule
  /// `(^|.*\.)entry($|\..*)`): LoRA leaves it out.
  bool inside_saved_module(const std::string& path) const;
};

/// The task heads PEFT's task models add to modules_to_save: {"classifier", "score"} for "SEQ_CLS" and "TOKEN_CLS",
/// {"qa_outputs"} for "QUESTION_ANS", none for other task types.
std::vector<std::string> task_heads(const std::string& task_type);

/// One module of a model, as select_targets sees it.
struct ModuleInfo {
  /// Path from the root, e.g. "model.layers.0.self_attn.q_proj".
  std::string path;
  /// Its type, for messages.
  std::string type_name;
  /// A Linear layer (or a LoRA layer wrapping one) that can take an adapter.
  bool is_linear = false;
  /// A Linear layer's shape (for loading adapters; -1 where unknown).
  int64_t in_features = -1;
  int64_t out_features = -1;
  /// The model's output layer (its output embeddings): "all-linear" leaves it out.
  bool is_output_layer = false;
  /// An embedding layer that can take an adapter (PEFT's lora_embedding_A/B; in/out features are num_embeddings and
  /// embedding_dim): selected when target_modules names it, never by "all-linear".
  bool is_embedding = false;
  /// A multi-head attention module (torch.nn.MultiheadAttention, PEFT's lora.MultiheadAttention): its adapter adapts
  /// the packed q/k/v projection (in/out features: embed_dim and 3·embed_dim) and the output projection, whose factors
  /// files name <path>.base_layer.out_proj.lora_A/B (io::kAttentionOutProj). Selected when target_modules names it,
  /// never by "all-linear".
  bool is_attention = false;
  /// A LoRA layer (lorafuse's, wrapping a base) or a modules-to-save layer: modules_to_save may not take it.
  bool is_lora_layer = false;
  /// A modules-to-save layer already (an earlier adapter's): a new adapter's modules_to_save adds its copy to it.
  bool is_saved_module = false;
  /// Whether LoRA can go into it (a Linear or an embedding layer).
  bool takes_lora() const noexcept { return is_linear || is_embedding || is_attention; }
};

/// A module that a config selects, with its adapter's options (rank_pattern/alpha_pattern applied).
struct TargetChoice {
  size_t index;  // into the modules given to select_targets
  nn::LoraAdapterOptions adapter;
};

/// The one implementation of PEFT's selection rules, shared by C++ inject_lora and the Python front:
/// validates `config`, then returns the Linear modules that target_modules selects and exclude_modules
/// does not. target_modules not given: the defaults for `model_type` (transformers' config.model_type; "" when the
/// model has none). ValueErrors: no target_modules and no defaults for the model's type, targets that match nothing
/// (the message lists the Linear layers that exist), a selected module that is not a Linear, everything excluded. A
/// list entry that matches nothing while others match is, as in PEFT, no error; PEFT says nothing, lorafuse warns
/// (pushed to `warnings` when given, else TORCH_WARN), except for the model type's default targets.
std::vector<TargetChoice> select_targets(const std::vector<ModuleInfo>& modules, const LoraConfig& config,
                                         const std::string& model_type = "",
                                         std::vector<std::string>* warnings = nullptr);

/// The modules that `config`'s saved_modules() wraps (indices into `modules`, in module order): each module whose path
/// ends with an entry (PEFT's rule), or a modules-to-save layer there already. ValueErrors naming the module: a LoRA
/// layer, a module holding LoRA layers, one such module inside another; with `strict` (inject_lora), also
/// modules_to_save entries of which none names a module (the task type's heads alone: a warning, as a model may name
/// its head otherwise). An entry that names nothing while others do is a warning, as with target_modules (not for the
/// task type's heads). Warnings go to `warnings` when given, else TORCH_WARN.
/// `lora_targets`: the modules that get LoRA layers with this config (select_targets' indices); one of them being a
/// module kept whole, or inside one, is a ValueError (PEFT refuses it too: a module trains whole or through LoRA).
std::vector<size_t> select_saved_modules(const std::vector<ModuleInfo>& modules, const LoraConfig& config,
                                         bool strict = true, std::vector<std::string>* warnings = nullptr,
                                         const std::vector<size_t>& lora_targets = {});

}  // namespace lorafuse
