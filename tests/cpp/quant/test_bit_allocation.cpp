// lorafuse::allocate_bits (<lorafuse/quant/bit_allocation.h>), LQ-LoRA's bit allocation: against brute-force
// enumeration and a dynamic program over integer storage, the edge budgets, the node limit and gap (a feasible choice,
// a certified bound), determinism, and every bad-input error.
// c10's logging defines a CHECK of its own: first, so that catch.h's CHECK (the one the tests use) wins
#include <c10/util/Logging.h>
#include <lorafuse/quant/bit_allocation.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "catch.h"
#include "nn/nn_test_util.h"

using lorafuse::allocate_bits;
using lorafuse::BitAllocation;
using lorafuse::BitAllocationOptions;
using lorafuse_test::require_error_parts;
using Table = std::vector<std::vector<double>>;

namespace {

struct Instance {
  Table cost, storage;
};

// Small integer values drawn from few choices: many exact ties and dominated configurations.
Instance random_instance(std::mt19937& rng, int matrices, int max_configs, int max_storage, int max_cost) {
  std::uniform_int_distribution<int> count(1, max_configs), s(1, max_storage), c(0, max_cost);
  Instance in;
  for (int i = 0; i < matrices; ++i) {
    const int k = count(rng);
    in.cost.emplace_back();
    in.storage.emplace_back();
    for (int j = 0; j < k; ++j) {
      in.cost.back().push_back(c(rng));
      in.storage.back().push_back(s(rng));
    }
  }
  return in;
}

double min_storage(const Instance& in) {
  double total = 0;
  for (const auto& row : in.storage) total += *std::min_element(row.begin(), row.end());
  return total;
}

double max_storage(const Instance& in) {
  double total = 0;
  for (const auto& row : in.storage) total += *std::max_element(row.begin(), row.end());
  return total;
}

// The least cost over every choice within the budget (+inf when none fits).
double brute_force(const Instance& in, double budget) {
  const size_t n = in.cost.size();
  std::vector<size_t> pick(n, 0);
  double best = std::numeric_limits<double>::infinity();
  for (;;) {
    double c = 0, s = 0;
    for (size_t i = 0; i < n; ++i) {
      c += in.cost[i][pick[i]];
      s += in.storage[i][pick[i]];
    }
    if (s <= budget) best = std::min(best, c);
    size_t i = 0;
    while (i < n && ++pick[i] == in.cost[i].size()) pick[i++] = 0;
    if (i == n) return best;
  }
}

// The least cost with integer storage: a dynamic program over the bits used.
double dynamic_program(const Instance& in, int budget) {
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> best(budget + 1, inf), next;
  best[0] = 0;
  for (size_t i = 0; i < in.cost.size(); ++i) {
    next.assign(budget + 1, inf);
    for (int used = 0; used <= budget; ++used) {
      if (best[used] == inf) continue;
      for (size_t k = 0; k < in.cost[i].size(); ++k) {
        const int s = static_cast<int>(in.storage[i][k]);
        if (used + s <= budget) next[used + s] = std::min(next[used + s], best[used] + in.cost[i][k]);
      }
    }
    best.swap(next);
  }
  return *std::min_element(best.begin(), best.end());
}

// The result is a valid choice whose totals it reports, within the budget, with a consistent bound and gap.
void check_consistent(const Instance& in, double budget, const BitAllocation& r) {
  REQUIRE(r.choice.size() == in.cost.size());
  double c = 0, s = 0;
  for (size_t i = 0; i < r.choice.size(); ++i) {
    REQUIRE(r.choice[i] >= 0);
    REQUIRE(r.choice[i] < static_cast<int64_t>(in.cost[i].size()));
    c += in.cost[i][r.choice[i]];
    s += in.storage[i][r.choice[i]];
  }
  CHECK(r.cost == Approx(c).epsilon(1e-12).margin(1e-12));
  CHECK(r.storage == Approx(s).epsilon(1e-12));
  CHECK(r.storage <= budget * (1 + 1e-12));
  CHECK(r.lower_bound <= r.cost);
  CHECK(r.gap >= 0);
  CHECK(r.gap == Approx((r.cost - r.lower_bound) / std::max(r.cost, std::numeric_limits<double>::min())));
  if (r.optimal) {
    CHECK(r.lower_bound == r.cost);
    CHECK(r.gap == 0);
  }
}

// Two configurations per matrix, one small and costly, one a big jump up in storage that costs nothing: a 0-1
// knapsack in disguise, whose LP relaxation rounds badly.
Instance big_jumps(std::mt19937& rng, int matrices) {
  std::uniform_real_distribution<double> u(0.5, 1.5);
  Instance in;
  for (int i = 0; i < matrices; ++i) {
    const double w = std::round(100 * u(rng));
    in.storage.push_back({1.0, 1.0 + w});
    in.cost.push_back({std::round(w * u(rng) * 10) / 10, 0.0});
  }
  return in;
}

}  // namespace

TEST_CASE("allocate_bits equals brute-force enumeration on small instances with ties and dominated configurations",
          "[cpu][quant][bit_allocation]") {
  std::mt19937 rng(1234);
  int solved = 0;
  for (int trial = 0; trial < 400; ++trial) {
    const int matrices = 1 + trial % 5;
    const auto in = random_instance(rng, matrices, 5, trial % 2 == 0 ? 4 : 12, trial % 3 == 0 ? 3 : 20);
    const double lo = min_storage(in), hi = max_storage(in);
    std::uniform_real_distribution<double> b(lo, hi + 2);
    for (const double budget : {lo, std::max(lo, std::floor(b(rng))), b(rng), hi}) {
      INFO("trial " << trial << ", budget " << budget);
      const auto r = allocate_bits(in.cost, in.storage, budget);
      check_consistent(in, budget, r);
      CHECK(r.optimal);
      CHECK(r.cost == Approx(brute_force(in, budget)).margin(1e-12));
      ++solved;
    }
  }
  CHECK(solved == 1600);
}

TEST_CASE("allocate_bits equals a dynamic program over integer storage on instances too large to enumerate",
          "[cpu][quant][bit_allocation]") {
  std::mt19937 rng(99);
  for (int trial = 0; trial < 30; ++trial) {
    // costs with a fractional part: fewer exact ties than above, so the search must tell near-ties apart
    auto in = random_instance(rng, 20 + trial, 8, 30, 1000);
    for (auto& row : in.cost) {
      for (auto& c : row) c /= 7.0;
    }
    const double lo = min_storage(in), hi = max_storage(in);
    const int budget = static_cast<int>(lo + (hi - lo) * (0.1 + 0.8 * (trial % 10) / 9.0));
    INFO("trial " << trial << ", budget " << budget);
    const auto r = allocate_bits(in.cost, in.storage, budget);
    check_consistent(in, budget, r);
    CHECK(r.optimal);
    CHECK(r.cost == Approx(dynamic_program(in, budget)).epsilon(1e-12));
  }
  // shaped like a model's: matrices of 3 sizes, costs falling 4x per bit with 1% noise (many near-ties)
  std::mt19937 model(8);
  std::lognormal_distribution<double> noise(0.0, 0.01);
  for (int trial = 0; trial < 4; ++trial) {
    Instance in;
    double units = 0;
    for (int i = 0; i < 90; ++i) {
      const double u = i % 3 == 0 ? 1 : i % 3 == 1 ? 3 : 8;
      units += u;
      in.cost.emplace_back();
      in.storage.emplace_back();
      for (const int bits : {2, 3, 4, 5, 6, 8}) {
        for (const int overhead : {0, 1, 2}) {
          in.storage.back().push_back(u * (4 * bits + overhead));
          in.cost.back().push_back(u * std::pow(4.0, -bits) * (1.0 + 0.1 * (2 - overhead)) * noise(model));
        }
      }
    }
    const int budget = static_cast<int>(units * (9 + 2 * trial));
    INFO("model-shaped trial " << trial << ", budget " << budget);
    const auto r = allocate_bits(in.cost, in.storage, budget);
    check_consistent(in, budget, r);
    CHECK(r.optimal);
    CHECK(r.cost == Approx(dynamic_program(in, budget)).epsilon(1e-12));
  }
  std::mt19937 jumps(5);
  for (int trial = 0; trial < 10; ++trial) {
    const auto in = big_jumps(jumps, 24);
    const int budget = static_cast<int>(min_storage(in) + 0.4 * (max_storage(in) - min_storage(in)));
    const auto r = allocate_bits(in.cost, in.storage, budget);
    check_consistent(in, budget, r);
    CHECK(r.optimal);
    CHECK(r.cost == Approx(dynamic_program(in, budget)).epsilon(1e-12));
  }
}

TEST_CASE("allocate_bits on one matrix takes the least-cost configuration that fits", "[cpu][quant][bit_allocation]") {
  const Table cost{{9.0, 4.0, 4.0, 1.0, 6.0}};
  const Table storage{{2.0, 5.0, 3.0, 8.0, 3.0}};
  CHECK(allocate_bits(cost, storage, 2.0).choice == std::vector<int64_t>{0});
  CHECK(allocate_bits(cost, storage, 4.0).choice == std::vector<int64_t>{2});  // 2 and 4 fit; 2 costs less
  CHECK(allocate_bits(cost, storage, 7.5).choice == std::vector<int64_t>{2});  // 1 ties 2 in cost with more bits
  const auto r = allocate_bits(cost, storage, 100.0);
  CHECK(r.choice == std::vector<int64_t>{3});
  CHECK(r.cost == 1.0);
  CHECK(r.storage == 8.0);
  CHECK(r.optimal);
  CHECK(r.gap == 0.0);
}

TEST_CASE("allocate_bits at a budget of exactly the least total storage takes each matrix's smallest configuration",
          "[cpu][quant][bit_allocation]") {
  // matrix 1 has two smallest configurations: the cheaper one; matrix 2: an exact tie, the lower index
  const Table cost{{5.0, 1.0, 0.5}, {3.0, 2.0, 0.0}, {7.0, 7.0, 1.0}};
  const Table storage{{1.5, 3.0, 6.0}, {2.0, 2.0, 9.0}, {4.0, 4.0, 5.0}};
  const auto r = allocate_bits(cost, storage, 7.5);
  CHECK(r.choice == std::vector<int64_t>{0, 1, 0});
  CHECK(r.cost == 14.0);
  CHECK(r.storage == 7.5);
  CHECK(r.optimal);
}

TEST_CASE("allocate_bits with a budget above every least-cost configuration takes them all",
          "[cpu][quant][bit_allocation]") {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 50; ++trial) {
    const auto in = random_instance(rng, 1 + trial % 12, 9, 20, 6);
    std::vector<int64_t> expected;
    for (size_t i = 0; i < in.cost.size(); ++i) {
      int64_t best = 0;  // least cost, then least storage, then lowest index
      for (int64_t k = 1; k < static_cast<int64_t>(in.cost[i].size()); ++k) {
        const auto& c = in.cost[i];
        const auto& s = in.storage[i];
        if (c[k] < c[best] || (c[k] == c[best] && s[k] < s[best])) best = k;
      }
      expected.push_back(best);
    }
    const double budget = max_storage(in) + trial;
    const auto r = allocate_bits(in.cost, in.storage, budget);
    check_consistent(in, budget, r);
    CHECK(r.choice == expected);
    CHECK(r.optimal);
    CHECK(r.nodes == 0);  // the LP's own solution: no search
  }
}

TEST_CASE("allocate_bits stopped by max_nodes or a relative gap returns a feasible choice with a certified bound",
          "[cpu][quant][bit_allocation]") {
  std::mt19937 rng(11);
  int limited = 0;
  for (int trial = 0; trial < 12; ++trial) {
    const auto in = big_jumps(rng, 40);
    const double budget = std::floor(min_storage(in) + 0.45 * (max_storage(in) - min_storage(in)));
    const auto exact = allocate_bits(in.cost, in.storage, budget);
    REQUIRE(exact.optimal);
    for (const int64_t max_nodes : {1, 2, 5, 20}) {
      INFO("trial " << trial << ", max_nodes " << max_nodes << ", exact search " << exact.nodes << " nodes");
      const auto r = allocate_bits(in.cost, in.storage, budget, BitAllocationOptions().max_nodes(max_nodes));
      check_consistent(in, budget, r);
      CHECK(r.nodes <= max_nodes);
      CHECK(r.lower_bound <= exact.cost * (1 + 1e-12));
      CHECK(r.cost >= exact.cost * (1 - 1e-12));
      if (exact.nodes > max_nodes) {
        CHECK_FALSE(r.optimal);
        ++limited;
      }
      if (!r.optimal) CHECK(r.gap > 0);
    }
    for (const double relative_gap : {0.2, 0.05, 0.01}) {
      const auto r = allocate_bits(in.cost, in.storage, budget, BitAllocationOptions().relative_gap(relative_gap));
      check_consistent(in, budget, r);
      CHECK(r.gap <= relative_gap + 1e-12);
      CHECK(r.lower_bound <= exact.cost * (1 + 1e-12));
      CHECK(r.cost * (1 - relative_gap) <= exact.cost * (1 + 1e-12));  // lower_bound <= the optimum
    }
  }
  CHECK(limited > 10);  // the node limit was really hit
}

TEST_CASE("allocate_bits is deterministic and ignores the order of configurations", "[cpu][quant][bit_allocation]") {
  std::mt19937 rng(21);
  for (int trial = 0; trial < 20; ++trial) {
    auto in = random_instance(rng, 15, 7, 25, 50);
    const double budget = std::floor((min_storage(in) + max_storage(in)) / 2);
    const auto a = allocate_bits(in.cost, in.storage, budget);
    const auto b = allocate_bits(in.cost, in.storage, budget);
    CHECK(a.choice == b.choice);
    CHECK(a.cost == b.cost);
    CHECK(a.nodes == b.nodes);
    for (size_t i = 0; i < in.cost.size(); ++i) {
      std::reverse(in.cost[i].begin(), in.cost[i].end());
      std::reverse(in.storage[i].begin(), in.storage[i].end());
    }
    CHECK(allocate_bits(in.cost, in.storage, budget).cost == a.cost);
  }
}

TEST_CASE("allocate_bits names the argument and what was found in every error", "[cpu][quant][bit_allocation]") {
  const Table cost{{1.0, 0.5}, {2.0, 1.0, 0.0}};
  const Table storage{{2.0, 4.0}, {2.0, 3.0, 8.0}};
  auto fails = [](const Table& c, const Table& s, double budget, const std::vector<std::string>& parts,
                  const BitAllocationOptions& o = BitAllocationOptions()) {
    require_error_parts<c10::ValueError>([&] { allocate_bits(c, s, budget, o); }, parts);
  };
  fails(cost, {{2.0, 4.0}}, 10.0, {"allocate_bits", "cost has 2 matrices but storage has 1", "one row per matrix"});
  fails({}, {}, 10.0, {"cost", "at least one matrix", "found none"});
  fails({{1.0}, {}}, {{1.0}, {}}, 10.0, {"cost[1]", "no configurations", "expected at least one"});
  fails(cost, {{2.0, 4.0}, {2.0, 3.0}}, 10.0, {"storage[1]", "expected 3 configurations (as cost[1] has), found 2"});
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  fails({{1.0, nan}, {2.0, 1.0, 0.0}}, storage, 10.0, {"cost[0][1]", "finite value >= 0", "found nan"});
  fails({{1.0, 0.5}, {2.0, -1.0, 0.0}}, storage, 10.0, {"cost[1][1]", "finite value >= 0", "found -1"});
  fails({{1.0, 0.5}, {2.0, 1.0, inf}}, storage, 10.0, {"cost[1][2]", "found inf"});
  fails(cost, {{2.0, 0.0}, {2.0, 3.0, 8.0}}, 10.0, {"storage[0][1]", "finite number of bits > 0", "found 0"});
  fails(cost, {{2.0, 4.0}, {-2.0, 3.0, 8.0}}, 10.0, {"storage[1][0]", "found -2"});
  fails(cost, {{2.0, 4.0}, {2.0, inf, 8.0}}, 10.0, {"storage[1][1]", "found inf"});
  fails(cost, storage, nan, {"budget", "finite number of bits", "found nan"});
  fails(cost, storage, -inf, {"budget", "found -inf"});
  // the least total is 2 + 2 = 4 bits; from 4 + 8 = 12 on every matrix has its least-cost configuration
  fails(cost, storage, 3.5,
        {"budget: 3.5 bits is below the smallest total storage, 4 bits", "expected at least 4", "from 12 bits on"});
  fails(cost, storage, 10.0, {"max_nodes", "at least 1", "found 0"}, BitAllocationOptions().max_nodes(0));
  fails(cost, storage, 10.0, {"relative_gap", "finite value >= 0", "found -0.1"},
        BitAllocationOptions().relative_gap(-0.1));
  // the same at the least total is fine
  CHECK(allocate_bits(cost, storage, 4.0).choice == std::vector<int64_t>{0, 0});
}
