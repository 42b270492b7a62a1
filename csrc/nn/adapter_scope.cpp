#include <c10/util/Exception.h>
#include <lorafuse/config/adapter_options.h>
#include <lorafuse/nn/adapter_scope.h>
#include <lorafuse/nn/row_adapters.h>

#include <atomic>
#include <utility>
#include <vector>

namespace lorafuse::nn {
namespace {

struct OpenScope {
  uint64_t id;
  std::string name;
  std::shared_ptr<const RowAdapters> rows;  // a mixed batch's per-row names, else null
};

// This thread's open scopes, innermost last (names held by value).
thread_local std::vector<OpenScope> t_scopes;
std::atomic<uint64_t> next_scope_id{1};

}  // namespace

AdapterScope::AdapterScope(std::string adapter_name) : id_(next_scope_id++) {
  if (!adapter_name.empty()) check_adapter_name(adapter_name);
  t_scopes.push_back({id_, std::move(adapter_name), nullptr});
}

AdapterScope::AdapterScope(std::vector<std::string> row_adapters)
    : AdapterScope(std::make_shared<const RowAdapters>(std::move(row_adapters), "AdapterScope")) {}

AdapterScope::AdapterScope(std::shared_ptr<const RowAdapters> rows) : id_(next_scope_id++) {
  TORCH_CHECK_VALUE(rows != nullptr, "AdapterScope: rows: expected the per-row adapters, found none");
  t_scopes.push_back({id_, kMixedBatch, std::move(rows)});
}

AdapterScope::~AdapterScope() {
  for (auto it = t_scopes.rbegin(); it != t_scopes.rend(); ++it) {
    if (it->id == id_) {
      t_scopes.erase(std::next(it).base());
      return;
    }
  }
}

std::optional<std::string> AdapterScope::current() {
  if (t_scopes.empty()) return std::nullopt;
  return t_scopes.back().name;
}

std::shared_ptr<const RowAdapters> AdapterScope::rows() {
  if (t_scopes.empty()) return nullptr;
  return t_scopes.back().rows;
}

}  // namespace lorafuse::nn
