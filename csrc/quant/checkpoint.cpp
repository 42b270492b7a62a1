// Model weights from and to Hugging Face checkpoint folders, 4-bit layers included (see
// <lorafuse/quant/checkpoint.h>; the file format is <lorafuse/io/checkpoint.h>).
#include <c10/core/TensorImpl.h>
#include <c10/util/Exception.h>
#include <lorafuse/io/checkpoint.h>
#include <lorafuse/io/files.h>
#include <lorafuse/nn/base_kind.h>
#include <lorafuse/nn/linear.h>
#include <lorafuse/nn/linear4bit.h>
#include <lorafuse/nn/lora_layer.h>
#include <lorafuse/quant/checkpoint.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/modules/linear.h>

#include <algorithm>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <typeinfo>
#include <utility>

namespace lorafuse {
namespace {

// A Linear or Linear4bit layer of the model.
struct Layer {
  torch::nn::Module* parent;
  std::string name, path;
  std::shared_ptr<torch::nn::Module> module;
  bool is_4bit;
};

void collect(torch::nn::Module& module, const std::string& prefix, std::vector<Layer>& out,
             std::vector<std::string>& lora) {
  for (const auto& child : module.named_children()) {
    const std::string path = prefix.empty() ? child.key() : prefix + "." + child.key();
    if (nn::as_lora_layer(child.value().get()) != nullptr) {
      lora.push_back(path);
      continue;
    }
    const auto* kind = nn::base_kind_of(*child.value());
    const std::string kind_name = kind != nullptr ? kind->name() : "";
    if (kind_name == "linear" || kind_name == "linear4bit") {
      out.push_back({&module, child.key(), path, child.value(), kind_name == "linear4bit"});
    } else {
      collect(*child.value(), path, out, lora);
    }
  }
}

std::vector<Layer> layers_of(torch::nn::Module& module, const char* what) {
  std::vector<Layer> layers;
  std::vector<std::string> lora;
  collect(module, "", layers, lora);
  TORCH_CHECK_VALUE(lora.empty(), what, ": the model has LoRA layers (", io::list_some(lora),
                    "); a checkpoint holds the base model: ",
                    std::string(what) == "load_checkpoint"
                        ? "load it before inject_lora"
                        : "save adapters with save_adapter, or merge_and_unload first");
  return layers;
}

bool under(const std::string& name, const std::set<std::string>& prefixes) {
  for (auto dot = name.rfind('.'); dot != std::string::npos; dot = name.rfind('.', dot - 1)) {
    if (prefixes.count(name.substr(0, dot))) return true;
    if (dot == 0) break;
  }
  return false;
}

// The model's parameters and persistent state, each tensor once: all its full names (a tied weight has several; the
// first is its name) and the tensor.
struct NamedState {
  std::vector<std::string> names;
  at::Tensor tensor;
};

std::vector<NamedState> named_state(torch::nn::Module& module) {
  std::vector<NamedState> out;
  std::map<const c10::TensorImpl*, size_t> index;
  for (auto dict : {module.named_parameters(true), module.named_buffers(true)}) {
    for (const auto& item : dict) {
      if (!item.value().defined()) continue;
      const auto [it, fresh] = index.emplace(item.value().unsafeGetTensorImpl(), out.size());
      if (fresh) out.push_back({{}, item.value()});
      out[it->second].names.push_back(item.key());
    }
  }
  return out;
}

// `target` (a parameter or buffer) takes `value`'s contents in place, so that every holder of it (a module's member
// and its registry) sees them: copy_ for a tensor with storage, and for a meta tensor what Tensor::set_data does,
// without its check that refuses a meta tensor (both are plain dense tensors, checked here); a meta tensor's values
// land on the CPU in its dtype.
void assign(const std::string& name, const at::Tensor& target, const at::Tensor& value) {
  torch::NoGradGuard no_grad;
  if (!target.is_meta()) {
    target.copy_(value);  // converts dtype and device
    return;
  }
  const at::Tensor v = value.to(target.scalar_type()).contiguous();
  TORCH_CHECK_VALUE(typeid(*target.unsafeGetTensorImpl()) == typeid(c10::TensorImpl) &&
                        typeid(*v.unsafeGetTensorImpl()) == typeid(c10::TensorImpl) && target.layout() == at::kStrided,
                    "load_checkpoint: \"", name, "\" is a meta tensor of a kind that cannot take values in place (",
                    typeid(*target.unsafeGetTensorImpl()).name(), "); make the model on the CPU instead");
  target.unsafeGetTensorImpl()->shallow_copy_from(v.getIntrusivePtr());
}

// The device of a module's tensors; nullopt on the meta device (a skeleton) or without tensors.
std::optional<c10::Device> device_of(const torch::nn::Module& module) {
  for (const auto& t : module.parameters()) return t.is_meta() ? std::nullopt : std::optional<c10::Device>(t.device());
  for (const auto& t : module.buffers()) return t.is_meta() ? std::nullopt : std::optional<c10::Device>(t.device());
  return std::nullopt;
}

std::string sizes_str(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << sizes;
  return out.str();
}

}  // namespace

CheckpointLoadPlan plan_checkpoint_load(const io::CheckpointReader& reader, const std::vector<CheckpointLayer>& layers,
                                        const std::vector<CheckpointState>& state,
                                        const std::map<std::string, std::string>& modules,
                                        const LoadCheckpointOptions& options,
                                        const std::function<void(size_t)>& replaceable) {
  if (options.quantize()) options.quantize()->validate();
  const std::string& dir = reader.dir();
  const auto nf4_names = reader.nf4_weights();
  const std::set<std::string> nf4(nf4_names.begin(), nf4_names.end());
  std::set<std::string> used;
  std::vector<std::string> missing;
  const auto& file_config = reader.quant_config();
  CheckpointLoadPlan plan;

  // 1. The 4-bit layers, built aside (4-bit bytes only; a dense weight quantized while loading is freed at once).
  std::set<std::string> handled;   // layers whose weight is read here or reported missing (a 4-bit layer's)
  std::set<std::string> replaced;  // layers that a 4-bit layer read here replaces, with all their tensors
  for (size_t i = 0; i < layers.size(); ++i) {
    const CheckpointLayer& l = layers[i];
    const std::string weight = l.path + ".weight";
    const int64_t in = l.in_features, out = l.out_features;
    const bool quantize_dense = reader.contains(weight) && !nf4.count(weight) &&
                                (l.nf4 || (options.quantize() && !options.quantize()->keeps_dense(l.path)));
    if (!nf4.count(weight) && !quantize_dense) {
      if (l.nf4) {
        handled.insert(l.path);
        missing.push_back(weight);
      }
      continue;
    }
    handled.insert(l.path);
    replaced.insert(l.path);
    if (replaceable) replaceable(i);  // the caller's veto, before anything is read for this layer
    at::Tensor bias;
    const std::string bias_name = l.path + ".bias";
    if (l.has_bias) {
      if (reader.contains(bias_name)) {
        const auto& e = reader.entry(bias_name);
        TORCH_CHECK_VALUE(e.shape == std::vector<int64_t>{out}, "load_checkpoint: \"", bias_name, "\" is ",
                          sizes_str(e.shape), " in the checkpoint; the model's layer has [", out, "]");
        bias = reader.read(bias_name);
        used.insert(bias_name);
      } else {
        missing.push_back(bias_name);
        bias = at::zeros({out});
      }
    }
    std::shared_ptr<nn::Linear4bitImpl> layer;
    if (nf4.count(weight)) {
      const io::Nf4Tensor t = reader.read_nf4(weight);
      TORCH_CHECK_VALUE(t.shape == std::vector<int64_t>({out, in}), "load_checkpoint: \"", weight, "\" is ",
                        sizes_str(t.shape), " in the checkpoint; the model's layer is [", out, ", ", in, "]");
      const auto compute = file_config && file_config->compute_dtype() ? *file_config->compute_dtype()
                           : options.quantize() && options.quantize()->compute_dtype()
                               ? *options.quantize()->compute_dtype()
                               : t.dtype;
      const auto f = t.format_list();
      layer = nn::Linear4bitImpl::from_nf4(nn::Linear4bitOptions(in, out)
                                               .bias(l.has_bias)
                                               .compute_dtype(compute)
                                               .blocksize(t.blocksize)
                                               .double_quant(t.nested())
                                               .bits(f[0])
                                               .stat_bits(t.nested() ? f[2] : 8)
                                               .stat_blocksize(t.nested() ? f[3] : 256)
                                               .stat_dtype(t.stat_dtype),
                                           t.weight, bias);
      for (const auto& n : reader.nf4_tensor_names(weight)) used.insert(n);
    } else {
      const auto& e = reader.entry(weight);
      TORCH_CHECK_VALUE(e.shape == std::vector<int64_t>({out, in}), "load_checkpoint: \"", weight, "\" is ",
                        sizes_str(e.shape), " in the checkpoint; the model's layer is [", out, ", ", in, "]");
      const QuantConfig& q = l.nf4 ? *l.nf4 : *options.quantize();  // as the model's 4-bit layer is quantized
      at::Tensor dense = reader.read(weight);
      try {  // quantize_nf4's own checks (dtype, finite values), with the tensor named
        layer = nn::Linear4bitImpl::from_weight(
            dense, bias,
            nn::linear4bit_options(q, in, out, bias.defined(), q.compute_dtype().value_or(dense.scalar_type())));
      } catch (const c10::TypeError& e) {
        C10_THROW_ERROR(TypeError, "load_checkpoint: \"" + weight + "\": " + e.what_without_backtrace());
      } catch (const c10::ValueError& e) {
        C10_THROW_ERROR(ValueError, "load_checkpoint: \"" + weight + "\": " + e.what_without_backtrace());
      }
      dense = at::Tensor();
      io::release_freed_memory();  // the dense weight's place, given back: the peak stays near the 4-bit size
      used.insert(weight);
    }
    if (layer->bias.defined()) layer->bias.set_requires_grad(false);
    plan.layers.emplace_back(i, std::move(layer));
  }

  for (const auto& w : nf4_names) {  // a 4-bit weight of a module that is not a Linear layer (else: unexpected)
    const auto dot = w.rfind('.');
    if (dot == std::string::npos || w.substr(dot) != ".weight") continue;
    const std::string path = w.substr(0, dot);
    const auto found = modules.find(path);
    TORCH_CHECK_VALUE(handled.count(path) || found == modules.end(), "load_checkpoint: ", dir, " stores \"", w,
                      "\" in 4 bits, but the model's \"", path, "\" is a ", found->second, ", not a Linear layer");
  }

  // 2. Every other parameter and buffer, matched by name and shape.
  for (size_t i = 0; i < state.size(); ++i) {
    const auto& names = state[i].names;
    // held only by layers replaced above: done; held elsewhere too (a tied weight), it loads for those holders
    if (std::all_of(names.begin(), names.end(), [&](const auto& n) { return under(n, replaced); })) continue;
    std::vector<std::string> present;  // a tied weight: under any of its names, once or more
    for (const auto& n : names) {
      if (reader.contains(n)) present.push_back(n);
    }
    if (present.empty()) {
      // a tensor of a 4-bit layer whose weight the checkpoint lacks: that weight is what is reported missing
      const bool reported = std::all_of(names.begin(), names.end(), [&](const auto& n) { return under(n, handled); });
      if (!reported) missing.push_back(names.front());
      continue;
    }
    const auto& e = reader.entry(present.front());
    TORCH_CHECK_VALUE(state[i].shape == e.shape, "load_checkpoint: \"", present.front(), "\" is ", sizes_str(e.shape),
                      " in the checkpoint; the model's is ", sizes_str(state[i].shape));
    plan.assignments.emplace_back(present.front(), i);
    used.insert(present.begin(), present.end());
  }
  std::vector<std::string> unexpected;
  for (const auto& name : reader.names()) {
    if (!used.count(name)) unexpected.push_back(name);
  }
  if (options.strict()) {
    TORCH_CHECK_VALUE(missing.empty(), "load_checkpoint: ", dir, " lacks ", missing.size(),
                      " tensor(s) of the model: ", io::list_some(missing),
                      ". Is it another model's checkpoint? (strict=False; in C++ "
                      "LoadCheckpointOptions().strict(false): loads what is there)");
    TORCH_CHECK_VALUE(unexpected.empty(), "load_checkpoint: ", dir, " holds ", unexpected.size(),
                      " tensor(s) that the model has no place for: ", io::list_some(unexpected),
                      ". Is it another model's checkpoint? (strict=False; in C++ "
                      "LoadCheckpointOptions().strict(false): ignores them)");
  } else {
    std::vector<std::string> meta;
    for (const auto& s : state) {
      const auto& names = s.names;
      const bool absent = std::none_of(names.begin(), names.end(), [&](const auto& n) { return reader.contains(n); });
      const bool elsewhere =
          std::any_of(names.begin(), names.end(), [&](const auto& n) { return !under(n, replaced); });
      if (elsewhere && s.is_meta && absent) meta.push_back(names.front());
    }
    TORCH_CHECK_VALUE(meta.empty(), "load_checkpoint: ", dir, " lacks ", meta.size(),
                      " tensor(s) that the model holds on the meta device (no values at all): ", io::list_some(meta));
  }
  return plan;
}

std::vector<std::string> load_checkpoint(torch::nn::Module& module, const std::string& dir,
                                         const LoadCheckpointOptions& options) {
  const io::CheckpointReader reader(dir);
  const std::vector<Layer> layers = layers_of(module, "load_checkpoint");
  std::vector<CheckpointLayer> described;
  for (const auto& l : layers) {
    const auto* kind = nn::base_kind_of(*l.module);
    CheckpointLayer d{l.path, kind->in_features(*l.module), kind->out_features(*l.module),
                      l.module->named_parameters(false).find("bias") != nullptr, std::nullopt};
    if (l.is_4bit) {
      const auto& o = l.module->as<nn::Linear4bitImpl>()->options;
      // a dense weight in the checkpoint is quantized as the model's layer is: QuantConfig says NF4 only (another
      // format's layer takes a checkpoint of its own format, read as it is)
      if (o.is_nf4()) {
        d.nf4 = QuantConfig().blocksize(o.blocksize()).double_quant(o.double_quant()).compute_dtype(o.compute_dtype());
      }
    }
    described.push_back(std::move(d));
  }
  const std::vector<NamedState> named = named_state(module);
  std::vector<CheckpointState> state;
  for (const auto& [names, tensor] : named) state.push_back({names, tensor.sizes().vec(), tensor.is_meta()});
  std::map<std::string, std::string> modules;
  for (const auto& item : module.named_modules()) modules.emplace(item.key(), item.value()->name());
  // a layer that becomes 4-bit must sit where it can be swapped: checked before anything of it is read
  const auto replaceable = [&](size_t index) {
    const Layer& l = layers[index];
    TORCH_CHECK_VALUE(nn::can_replace_child(*l.parent, l.name),
                      nn::cannot_replace_message(*l.parent, l.path, "load_checkpoint"));
  };
  CheckpointLoadPlan plan = plan_checkpoint_load(reader, described, state, modules, options, replaceable);
  // Apply: nothing above changed the model.
  for (const auto& [name, index] : plan.assignments) assign(name, named[index].tensor, reader.read(name));
  std::vector<std::string> paths;
  for (auto& [index, layer] : plan.layers) {
    const Layer& l = layers[index];
    layer->train(l.module->is_training());
    if (const auto device = device_of(*l.module)) layer->to(*device);  // a model on its device: the layer joins it
    nn::replace_child(*l.parent, l.name, std::move(layer));
    paths.push_back(l.path);
  }
  return paths;
}

void save_checkpoint(torch::nn::Module& module, const std::string& dir, const std::string& model_config_json) {
  const std::vector<Layer> layers = layers_of(module, "save_checkpoint");
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  std::set<std::string> quantized;
  std::vector<std::string> dense_linear;
  for (const auto& l : layers) {
    if (!l.is_4bit) {
      dense_linear.push_back(l.path);
      continue;
    }
    const auto* q = l.module->as<nn::Linear4bitImpl>();
    io::Nf4Tensor t;
    t.format = q->options.format();
    t.stat_dtype = q->options.stat_dtype();
    t.weight = {q->packed, q->absmax, q->nested_absmax, q->offset};
    t.blocksize = q->options.blocksize();
    t.shape = {q->options.out_features(), q->options.in_features()};
    t.dtype = q->options.compute_dtype();
    for (auto& entry : io::nf4_checkpoint_tensors(l.path + ".weight", t)) tensors.push_back(std::move(entry));
    if (q->bias.defined()) tensors.emplace_back(l.path + ".bias", q->bias);
    quantized.insert(l.path);
  }
  for (const auto& [names, tensor] : named_state(module)) {  // a tied weight once, under its first name
    if (under(names.front(), quantized)) continue;
    TORCH_CHECK_VALUE(!tensor.is_meta(), "save_checkpoint: \"", names.front(),
                      "\" is on the meta device (it has no values); load or initialise it first");
    tensors.emplace_back(names.front(), tensor);
  }
  io::write_checkpoint(dir, model_config_json, tensors, dense_linear);
}

}  // namespace lorafuse
