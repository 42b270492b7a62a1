#include <ATen/ops/tensor.h>
#include <c10/util/Exception.h>
#include <lorafuse/config/adapter_options.h>
#include <lorafuse/nn/row_adapters.h>

#include <algorithm>
#include <set>
#include <sstream>

namespace lorafuse::nn {
namespace {

std::string quoted(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + ("\"" + n + "\"");
  return "[" + out + "]";
}

}  // namespace

RowAdapters::RowAdapters(std::vector<std::string> names, const std::string& what) : names_(std::move(names)) {
  TORCH_CHECK_VALUE(!names_.empty(), what, ": adapter names: expected one name per row of the batch, found an empty ",
                    "list");
  std::vector<std::string> invalid, distinct;
  for (const auto& n : names_) {
    if (std::find(distinct.begin(), distinct.end(), n) == distinct.end()) distinct.push_back(n);
  }
  for (const auto& n : distinct) {
    if (is_base(n)) continue;
    try {
      check_adapter_name(n);
    } catch (const c10::Error&) {
      invalid.push_back(n);
    }
  }
  TORCH_CHECK_VALUE(invalid.empty(), what, ": adapter names ", quoted(invalid), " are not valid adapter names");
  const auto unknown = HeldAdapterNames::unknown(distinct);
  TORCH_CHECK_VALUE(unknown.empty(), what, ": no LoRA layer has adapters named ", quoted(unknown), " (the adapters ",
                    "loaded: ", AdapterTable::join(HeldAdapterNames::all()), "; \"__base__\" runs a row on the base ",
                    "model)");
}

RowAdapters::Plan RowAdapters::plan(const AdapterTable& table, const std::vector<std::string>& available,
                                    c10::IntArrayRef x_sizes, const c10::Device& device) const {
  // rows: x's first dimension (sequences of tokens in [batch, seq, in]); a 1-D x is one row of one token
  const int64_t rows = x_sizes.size() >= 2 ? x_sizes[0] : 1;
  int64_t leading = 1;
  for (size_t d = 0; d + 1 < x_sizes.size(); ++d) leading *= x_sizes[d];
  const int64_t tokens = rows > 0 ? leading / rows : 0;
  TORCH_CHECK_VALUE(table.merged().empty(), "use_adapter(", AdapterTable::join(names_), "): this layer has ",
                    AdapterTable::join(table.merged()), " merged into its weight; a batch with one adapter per row ",
                    "needs unmerged adapters (unmerge first)");
  const auto n = static_cast<int64_t>(names_.size());
  TORCH_CHECK_VALUE(rows % n == 0, "use_adapter: ", n, " adapter names for a batch of ", rows, " rows; expected one ",
                    "name per row (or per group of consecutive rows, as generate repeats rows for beams and ",
                    "num_return_sequences)");
  // which of this layer's adapters each name is (-1: the base), in first-appearance order
  std::vector<std::string> present;
  std::vector<int64_t> index;
  index.reserve(names_.size());
  for (const auto& name : names_) {
    if (!table.enabled() || is_base(name) || std::find(available.begin(), available.end(), name) == available.end()) {
      index.push_back(-1);
      continue;
    }
    auto it = std::find(present.begin(), present.end(), name);
    if (it == present.end()) it = present.insert(present.end(), name);
    index.push_back(it - present.begin());
  }
  Plan plan;
  if (present.empty()) return plan;
  plan.adapters = present;
  plan.uniform = present.size() == 1 && std::all_of(index.begin(), index.end(), [](int64_t i) { return i == 0; });
  if (plan.uniform) return plan;  // the layer runs its plain path: no grouping needed
  for (const auto& name : present) {
    TORCH_CHECK_VALUE(!table.options(name).use_dora(), "use_adapter(", AdapterTable::join(names_), "): adapter \"",
                      name,
                      "\" is a DoRA adapter (use_dora), which batches with one adapter per row do not support "
                      "yet; run its rows in a batch of their own (use_adapter(\"",
                      name, "\"))");
  }
  std::ostringstream key;
  for (const int64_t i : index) key << i << ',';
  key << '|' << rows << '|' << tokens << '|' << device;
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = cache_.find(key.str());
  if (it != cache_.end()) return it->second;
  // row t of the token rows belongs to name (t / tokens) / (rows / n)
  std::vector<int64_t> per_row;
  per_row.reserve(static_cast<size_t>(rows * tokens));
  for (int64_t r = 0; r < rows; ++r) per_row.insert(per_row.end(), static_cast<size_t>(tokens), index[r / (rows / n)]);
  const at::Tensor row_adapter = at::tensor(per_row, at::TensorOptions().dtype(at::kLong)).to(device);
  plan.segments = lora_segments(row_adapter, static_cast<int64_t>(present.size()));
  cache_.emplace(key.str(), plan);
  return plan;
}

std::vector<std::pair<std::string, std::vector<int64_t>>> RowAdapters::row_groups(
    int64_t rows, const std::vector<std::string>& available) const {
  const auto n = static_cast<int64_t>(names_.size());
  TORCH_CHECK_VALUE(rows % n == 0, "use_adapter: ", n, " adapter names for a batch of ", rows, " rows; expected one ",
                    "name per row (or per group of consecutive rows, as generate repeats rows for beams and ",
                    "num_return_sequences)");
  std::vector<std::pair<std::string, std::vector<int64_t>>> groups;
  for (int64_t r = 0; r < rows; ++r) {
    std::string name = names_[static_cast<size_t>(r / (rows / n))];
    if (is_base(name) || std::find(available.begin(), available.end(), name) == available.end()) name.clear();
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == name; });
    if (it == groups.end()) it = groups.insert(groups.end(), {name, {}});
    it->second.push_back(r);
  }
  return groups;
}

double RowAdapters::dropout(const std::vector<std::string>& adapters, const std::vector<double>& dropouts,
                            bool training) const {
  if (!training || dropouts.empty()) return 0.0;
  const std::set<double> distinct(dropouts.begin(), dropouts.end());
  if (distinct.size() == 1) return dropouts.front();
  std::ostringstream values;
  for (const double p : distinct) values << (values.tellp() > 0 ? ", " : "") << p;
  TORCH_CHECK_VALUE(false, "use_adapter(", AdapterTable::join(names_), "): adapters ", AdapterTable::join(adapters),
                    " have different lora_dropout [", values.str(), "]; a mixed batch trains with one dropout ",
                    "probability (train them in separate batches, or evaluate)");
}

}  // namespace lorafuse::nn
