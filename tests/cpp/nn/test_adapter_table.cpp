// The adapter table (<lorafuse/nn/adapter_table.h>) and the model-wide rules over tables
// (<lorafuse/peft/rules.h>): the bookkeeping both the C++ LoraLinear and Python's lorafuse.nn.Linear use.
#include <ATen/ATen.h>
#include <lorafuse/nn/adapter_table.h>
#include <lorafuse/peft/rules.h>

#include "catch.h"
#include "nn/nn_test_util.h"

using lorafuse::nn::AdapterTable;
using lorafuse::nn::LoraAdapterOptions;
using lorafuse_test::require_error_parts;

namespace {

AdapterTable table_with(const std::vector<std::string>& names) {
  AdapterTable t;
  for (const auto& n : names) t.add(n, LoraAdapterOptions(4).lora_alpha(8), /*activate=*/true);
  return t;
}

}  // namespace

TEST_CASE("adapter table: adding, the first adapter active, dtypes, refusals", "[cpu][nn][adapter_table]") {
  AdapterTable t;
  CHECK(t.check_add("a", LoraAdapterOptions(4), at::kHalf) == at::kFloat);
  CHECK(t.check_add("a", LoraAdapterOptions(4), at::kBFloat16) == at::kFloat);
  CHECK(t.check_add("a", LoraAdapterOptions(4), at::kDouble) == at::kDouble);
  CHECK(t.check_add("a", LoraAdapterOptions(4).dtype(at::kHalf), at::kHalf) == at::kHalf);
  require_error_parts<c10::TypeError>([&] { t.check_add("a", LoraAdapterOptions(4).dtype(at::kHalf), at::kBFloat16); },
                                      {"dtype", "BFloat16", "Half"});
  require_error_parts<c10::TypeError>([&] { t.check_add("a", LoraAdapterOptions(4), at::kChar); },
                                      {"base_layer", "Char", "quantized base"});
  require_error_parts<c10::ValueError>([&] { t.check_add("a.b", LoraAdapterOptions(4), at::kFloat); },
                                       {"adapter_name", "a.b"});
  require_error_parts<c10::ValueError>([&] { t.check_add("a", LoraAdapterOptions(0), at::kFloat); }, {"r", "0"});

  CHECK(t.add("a", LoraAdapterOptions(4), /*activate=*/true));
  CHECK_FALSE(t.add("b", LoraAdapterOptions(2), /*activate=*/true));  // a later adapter waits
  CHECK(t.names() == std::vector<std::string>{"a", "b"});
  CHECK(t.active() == "a");
  CHECK(t.trains("a"));
  CHECK_FALSE(t.trains("b"));
  require_error_parts<c10::ValueError>([&] { t.check_add("a", LoraAdapterOptions(4), at::kFloat); },
                                       {"adapter_name", "\"a\" already exists", "[a, b]"});
  AdapterTable quiet;
  CHECK_FALSE(quiet.add("x", LoraAdapterOptions(4), /*activate=*/false));
  CHECK(quiet.active().empty());
  require_error_parts<c10::ValueError>([&] { t.options("zz", "lora_a"); }, {"lora_a", "no adapter named \"zz\""});
}

TEST_CASE("adapter table: activating, removing, routing under scopes", "[cpu][nn][adapter_table]") {
  AdapterTable t = table_with({"a", "b"});
  CHECK_FALSE(t.check_activate("b"));  // nothing merged: no unmerge
  CHECK_FALSE(t.check_clear());
  t.activate("b");
  CHECK(t.route(std::nullopt) == "b");
  CHECK(t.route(std::string("a")) == "a");
  CHECK(t.route(std::string("")).empty());
  CHECK(t.route(std::string("other")) == "other");  // the layer lacks it: the caller finds no weights
  require_error_parts<c10::ValueError>([&] { t.check_activate("zz"); }, {"set_adapter", "zz"});

  t.set_enabled(false);
  CHECK(t.route(std::nullopt).empty());
  CHECK(t.route(std::string("a")).empty());
  t.set_enabled(true);

  t.set_merged(t.plan_merge({}));
  CHECK(t.merged() == std::vector<std::string>{"b"});
  CHECK(t.route(std::nullopt).empty());  // merged: the weight holds it
  require_error_parts<c10::ValueError>([&] { t.route(std::string("a")); },
                                       {"AdapterScope(\"a\")", "[b] merged into its weight"});
  CHECK(t.check_activate("a"));  // switching away from a merged adapter unmerges first
  CHECK(t.check_clear());        // so does clearing
  require_error_parts<c10::ValueError>([&] { t.check_activate(""); }, {"set_adapter", "no adapter named \"\""});
  CHECK_FALSE(t.check_activate("b"));
  require_error_parts<c10::ValueError>([&] { t.check_remove("b"); }, {"delete_adapter", "\"b\" is merged"});
  t.set_merged({});

  CHECK(t.remove("b"));  // the active one: the first remaining becomes active
  CHECK(t.active() == "a");
  CHECK(t.remove("a"));
  CHECK(t.active().empty());
  CHECK(t.names().empty());
}

TEST_CASE("adapter table: merge plans start from the unmerged weight, refusals name the problem",
          "[cpu][nn][adapter_table]") {
  AdapterTable t = table_with({"a", "b", "c"});
  CHECK(t.plan_merge({"b"}) == std::vector<std::string>{"b"});
  t.set_merged({"b"});
  CHECK(t.plan_merge({"c", "a"}) == std::vector<std::string>{"b", "c", "a"});
  // merged already: left as it is with a warning (PEFT), nothing new to merge
  std::vector<std::string> plan;
  lorafuse_test::require_warning_parts([&] { plan = t.plan_merge({"b"}); },
                                       {"merge: [b] already merged", "nothing to do"});
  CHECK(plan == t.merged());
  lorafuse_test::require_warning_parts(
      [&] {
        plan = t.plan_merge({"b", "c"});
      },
      {"[b] already merged", "merging [c] only"});
  CHECK(plan == std::vector<std::string>{"b", "c"});
  require_error_parts<c10::ValueError>([&] { t.plan_merge({"a", "a"}); }, {"merge", "\"a\" is named twice"});
  require_error_parts<c10::ValueError>([&] { t.plan_merge({"zz"}); }, {"merge", "no adapter named \"zz\""});
  CHECK(t.plan_unload() == std::vector<std::string>{"b", "a"});  // the active adapter folded in too
  t.set_merged({});
  require_error_parts<c10::ValueError>([&] { t.check_unmerge(); }, {"unmerge", "nothing is merged"});
  t.set_enabled(false);
  require_error_parts<c10::ValueError>([&] { t.plan_merge({}); }, {"merge", "disabled", "enable_adapters()"});
  CHECK(t.plan_unload() == std::vector<std::string>{"a"});  // merge_and_unload also while disabled, as PEFT
  AdapterTable none;
  none.add("x", LoraAdapterOptions(4), /*activate=*/false);
  require_error_parts<c10::ValueError>([&] { none.plan_merge({}); }, {"no active adapter"});
  CHECK(none.plan_unload().empty());
}

TEST_CASE("adapter table: JSON round trip and checked reading", "[cpu][nn][adapter_table]") {
  AdapterTable t = table_with({"a", "b"});
  t.activate("b");
  t.set_merged({"a"});
  t.set_enabled(false);
  const AdapterTable back = AdapterTable::from_json(t.to_json(), "test");
  CHECK(back.to_json() == t.to_json());
  CHECK(back.names() == t.names());
  CHECK(back.active() == "b");
  CHECK_FALSE(back.enabled());
  CHECK(back.merged() == std::vector<std::string>{"a"});
  CHECK(back.describe() == t.describe());
  CHECK(t.describe() ==
        "adapters=[a(r=4, lora_alpha=8, lora_dropout=0), b(r=4, lora_alpha=8, lora_dropout=0)], active=b, disabled, "
        "merged=[a]");
  require_error_parts<c10::ValueError>(
      [&] { AdapterTable::from_json(R"({"adapters": [], "active": "x", "enabled": true, "merged": []})", "ctx"); },
      {"ctx", "active adapter \"x\""});
  require_error_parts<c10::ValueError>([&] { AdapterTable::from_json("{", "ctx"); }, {"ctx", "cannot read"});
}

TEST_CASE("adapter init: PEFT's three init_lora_weights", "[cpu][nn][adapter_table]") {
  at::manual_seed(0);
  for (const char* init : {"true", "gaussian", "false"}) {
    auto a = at::full({4, 64}, 7.0);
    auto b = at::full({32, 4}, 7.0);
    lorafuse::nn::init_adapter_weights(a, b, LoraAdapterOptions(4).init_lora_weights(init));
    const double bound = 1.0 / std::sqrt(64.0);  // kaiming-uniform with a = √5: 1/√fan_in
    if (std::string(init) == "gaussian") {
      CHECK(a.std().item<double>() == Approx(0.25).epsilon(0.2));
    } else {
      CHECK(a.abs().max().item<double>() <= bound);
      CHECK(a.abs().max().item<double>() > 0.5 * bound);
    }
    if (std::string(init) == "false") {
      CHECK(b.abs().max().item<double>() <= 0.5);  // 1/√4
      CHECK(b.abs().max().item<double>() > 0.1);
    } else {
      CHECK(b.abs().max().item<double>() == 0.0);
    }
  }
}

TEST_CASE("model-wide rules over tables", "[cpu][peft][rules]") {
  namespace rules = lorafuse::rules;
  AdapterTable q = table_with({"a", "b"});
  AdapterTable v = table_with({"b"});  // this layer lacks "a"; its active adapter is "b"
  q.activate("a");
  rules::LayerTables layers = {{"q", &q}, {"v", &v}};
  CHECK(rules::adapter_names(layers) == std::vector<std::string>{"a", "b"});
  CHECK(rules::active_adapter(layers) == "a");
  CHECK(rules::plan_set_adapter(layers, "a") == std::vector<std::string>{"a", ""});
  require_error_parts<c10::ValueError>([&] { rules::plan_set_adapter(layers, "zz"); },
                                       {"set_adapter: no layer has an adapter named \"zz\"", "[a, b]"});
  CHECK(rules::plan_merge(layers, {"b"}, "merge_adapter") == std::vector<std::vector<std::string>>{{"b"}, {"b"}});
  CHECK(rules::plan_merge(layers, {}, "merge") == std::vector<std::vector<std::string>>{{"a"}, {}});
  require_error_parts<c10::ValueError>([&] { rules::check_unmerge(layers, "unmerge"); },
                                       {"unmerge: nothing is merged in this model"});
  CHECK(rules::plan_delete_adapter(layers, "a") == std::optional<std::string>("b"));
  CHECK(rules::plan_delete_adapter(layers, "b") == std::nullopt);  // not the active one
  v.set_merged({"b"});
  require_error_parts<c10::ValueError>([&] { rules::plan_delete_adapter(layers, "b"); },
                                       {"delete_adapter", "\"b\" is merged into \"v\""});
  std::vector<std::vector<std::string>> plan;
  lorafuse_test::require_warning_parts(
      [&] { plan = rules::plan_merge(layers, {"b"}, "merge_adapter"); },
      {"merge_adapter: already merged, left as it is: \"b\" in \"v\"", "merging into 1 layers"});
  CHECK(plan == std::vector<std::vector<std::string>>{{"b"}, {}});
  v.set_merged({});
  q.set_enabled(false);
  require_error_parts<c10::ValueError>([&] { rules::plan_merge(layers, {"b"}, "merge"); },
                                       {"merge", "disabled in \"q\""});
  CHECK_FALSE(rules::starts_disabled(layers));
  v.set_enabled(false);
  CHECK(rules::starts_disabled(layers));
  CHECK_FALSE(rules::starts_disabled({}));
  CHECK(rules::bias_mode(layers, "a") == "none");
  AdapterTable w;
  w.add("c", LoraAdapterOptions(4).bias("lora_only"), true);
  CHECK(rules::bias_mode({{"w", &w}}, "c") == "lora_only");
}

TEST_CASE("model-wide rules: new names, trained biases, where a file's biases go", "[cpu][peft][rules]") {
  namespace rules = lorafuse::rules;
  AdapterTable q, v;
  q.add("a", LoraAdapterOptions(4).bias("lora_only"), true);
  v.add("b", LoraAdapterOptions(4).bias("all"), true);
  rules::LayerTables layers = {{"m.q", &q}, {"m.v", &v}};
  require_error_parts<c10::ValueError>(
      [&] { rules::check_new_adapter(layers, "b", ". Load under another name"); },
      {"adapter_name: the model already has an adapter named \"b\"", "[a, b]", ". Load under another name"});
  rules::check_new_adapter(layers, "c");
  const std::vector<std::string> params = {
      "m.q.base_layer.weight", "m.q.base_layer.bias", "m.v.base_layer.bias", "m.o.bias", "bias",
      "m.q.lora_A.a.weight",   "m.biasless"};
  CHECK(rules::trained_biases(layers, params, "a") == std::vector<std::string>{"m.q.base_layer.bias"});
  CHECK(rules::trained_biases(layers, params, "b") ==
        std::vector<std::string>{"m.q.base_layer.bias", "m.v.base_layer.bias", "m.o.bias", "bias"});
  CHECK(rules::trained_biases(layers, params, "zz").empty());

  using Shapes = std::vector<std::pair<std::string, std::vector<int64_t>>>;
  const Shapes model = {{"m.q.base_layer.bias", {8}}, {"m.o.bias", {4}}, {"bias", {2}}};
  CHECK(rules::match_biases({{"m.q.bias", {8}}, {"m.o.base_layer.bias", {4}}, {"bias", {2}}}, model, "load") ==
        std::vector<std::string>{"m.q.base_layer.bias", "m.o.bias", "bias"});
  require_error_parts<c10::ValueError>(
      [&] {
        rules::match_biases({{"m.k.bias", {8}}}, model, "load_adapter");
      },
      {"load_adapter", "\"m.k.bias\", which the model lacks"});
  require_error_parts<c10::ValueError>(
      [&] {
        rules::match_biases({{"m.q.bias", {3}}}, model, "load_adapter");
      },
      {"load_adapter", "\"m.q.bias\" is [3] in the file but [8] in the model"});
  require_error_parts<c10::ValueError>(
      [&] {
        rules::match_biases({{"other", {2}}}, model, "load");
      },
      {"\"other\", which the model lacks"});
}
