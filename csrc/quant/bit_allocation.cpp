#include <c10/util/Exception.h>
#include <lorafuse/quant/bit_allocation.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <utility>

namespace lorafuse {
namespace {

// Sums of doubles round: feasibility and pruning allow this relative slack (storage: of the budget; cost: of the
// incumbent's cost).
constexpr double kRel = 1e-12;
constexpr double kInf = std::numeric_limits<double>::infinity();

double tie(double cost) { return kRel * std::fabs(cost); }

// The shortest decimal that reads back as `v` (budgets are often ~1e9 bits: a stream's 6 digits would hide them).
std::string num(double v) {
  char buf[40];
  for (int precision = 6; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof buf, "%.*g", precision, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

struct Config {
  double s;       // storage (bits)
  double c;       // cost
  int64_t index;  // in the matrix's row as given
};
using Configs = std::vector<Config>;

// Cost saved per bit moving from a to b (b: more storage, less cost).
double efficiency(const Config& a, const Config& b) { return (a.c - b.c) / (b.s - a.s); }

// The configurations no other beats: storage strictly increasing, cost strictly decreasing. Sorted by (storage, cost,
// index), each that costs strictly less than all before it stays: dominated ones go and, of exact ties, the lowest
// index stays.
Configs efficient(const std::vector<double>& cost, const std::vector<double>& storage) {
  Configs all;
  all.reserve(cost.size());
  for (size_t k = 0; k < cost.size(); ++k) all.push_back({storage[k], cost[k], static_cast<int64_t>(k)});
  std::sort(all.begin(), all.end(), [](const Config& a, const Config& b) {
    if (a.s != b.s) return a.s < b.s;
    if (a.c != b.c) return a.c < b.c;
    return a.index < b.index;
  });
  Configs kept;
  for (const auto& cfg : all) {
    if (kept.empty() || cfg.c < kept.back().c) kept.push_back(cfg);
  }
  return kept;
}

// Positions (into an efficient list) of its lower convex hull, cost as a function of storage: efficiencies strictly
// decreasing along it, compared exactly as the LP's sort compares them, so a matrix's steps stay in their order.
std::vector<size_t> lower_hull(const Configs& pts) {
  std::vector<size_t> hull;
  for (size_t k = 0; k < pts.size(); ++k) {
    while (hull.size() >= 2 &&
           efficiency(pts[hull[hull.size() - 2]], pts[hull.back()]) <= efficiency(pts[hull.back()], pts[k])) {
      hull.pop_back();
    }
    hull.push_back(k);
  }
  return hull;
}

// One step along a matrix's hull, from hull point `step` to the next.
struct Step {
  double e, ds, dc;  // efficiency, storage added (> 0), cost added (< 0)
  size_t group;      // the matrix (its position in the list the steps were made from)
  size_t step;
};

// All hull steps of the groups in the LP greedy's order: efficiency descending (ties: group, then step).
std::vector<Step> hull_steps(const std::vector<const Configs*>& groups) {
  std::vector<Step> steps;
  for (size_t g = 0; g < groups.size(); ++g) {
    const auto& pts = *groups[g];
    const auto hull = lower_hull(pts);
    for (size_t j = 0; j + 1 < hull.size(); ++j) {
      const auto& a = pts[hull[j]];
      const auto& b = pts[hull[j + 1]];
      steps.push_back({efficiency(a, b), b.s - a.s, b.c - a.c, g, j});
    }
  }
  std::sort(steps.begin(), steps.end(), [](const Step& a, const Step& b) {
    if (a.e != b.e) return a.e > b.e;
    if (a.group != b.group) return a.group < b.group;
    return a.step < b.step;
  });
  return steps;
}

// The LP relaxation at the root (Sinha–Zoltners): every matrix at its smallest configuration, then hull steps by
// efficiency while they fit; the first that does not is taken in part, and its efficiency is the multiplier λ.
struct RootLp {
  double value = 0.0;
  double lagrange = -kInf;  // L(λ) = Σ min_c (cost + λ·storage) − λ·budget: a lower bound too
  // rc = cost + λ·storage − that minimum, per configuration: an allocation costs at least L + Σ rc of its choices
  std::vector<std::vector<double>> reduced;
  std::vector<size_t> rounded;  // the LP solution rounded down (feasible): a position into each efficient list
};

RootLp solve_root_lp(const std::vector<Configs>& eff, double budget, double min_total) {
  const size_t n = eff.size();
  std::vector<const Configs*> groups(n);
  for (size_t i = 0; i < n; ++i) groups[i] = &eff[i];
  std::vector<size_t> taken(n, 0);
  RootLp lp;
  for (const auto& e : eff) lp.value += e.front().c;
  double room = budget - min_total, lambda = 0.0;
  for (const auto& st : hull_steps(groups)) {
    if (st.ds <= room) {
      room -= st.ds;
      lp.value += st.dc;
      ++taken[st.group];
    } else {
      lp.value += st.dc * (std::max(room, 0.0) / st.ds);
      lambda = st.e;
      break;
    }
  }
  lp.reduced.resize(n);
  lp.rounded.resize(n);
  const bool finite = std::isfinite(lambda);  // (an infinite one, from absurd data, fixes nothing)
  if (finite) lp.lagrange = -lambda * budget;
  for (size_t i = 0; i < n; ++i) {
    lp.rounded[i] = lower_hull(eff[i])[taken[i]];
    double best = kInf;
    for (const auto& cfg : eff[i]) best = std::min(best, cfg.c + lambda * cfg.s);
    if (finite) lp.lagrange += best;
    for (const auto& cfg : eff[i]) lp.reduced[i].push_back(finite ? std::max(0.0, cfg.c + lambda * cfg.s - best) : 0.0);
  }
  return lp;
}

// One change of one matrix's configuration in a local search.
struct Move {
  double ds, dc;  // storage and cost it adds
  size_t i, k;    // matrix, configuration (position in its efficient list)
};

// Improves a feasible choice by local search: the change of one matrix, or of two, that saves the most cost within the
// budget, again and again until none saves anything (pairs let a matrix give up bits that another puts to better use).
void improve_locally(const std::vector<Configs>& eff, std::vector<size_t>& pick, double budget, double tol_s) {
  const size_t n = eff.size();
  std::vector<Move> moves;
  std::vector<size_t> best1, best2;  // per prefix of moves by storage: the least dc, and the least of another matrix
  for (;;) {
    double used = 0.0, now = 0.0;
    for (size_t i = 0; i < n; ++i) {
      used += eff[i][pick[i]].s;
      now += eff[i][pick[i]].c;
    }
    const double room = budget + tol_s - used;
    moves.clear();
    for (size_t i = 0; i < n; ++i) {
      for (size_t k = 0; k < eff[i].size(); ++k) {
        if (k != pick[i]) moves.push_back({eff[i][k].s - eff[i][pick[i]].s, eff[i][k].c - eff[i][pick[i]].c, i, k});
      }
    }
    std::sort(moves.begin(), moves.end(), [](const Move& a, const Move& b) {
      if (a.ds != b.ds) return a.ds < b.ds;
      if (a.dc != b.dc) return a.dc < b.dc;
      return a.i != b.i ? a.i < b.i : a.k < b.k;
    });
    const size_t none = moves.size();
    best1.assign(moves.size(), none);
    best2.assign(moves.size(), none);
    for (size_t m = 0; m < moves.size(); ++m) {
      size_t b1 = m == 0 ? none : best1[m - 1], b2 = m == 0 ? none : best2[m - 1];
      if (b1 == none || moves[m].dc < moves[b1].dc) {
        if (b1 != none && moves[b1].i != moves[m].i) b2 = b1;
        b1 = m;
      } else if (moves[m].i != moves[b1].i && (b2 == none || moves[m].dc < moves[b2].dc)) {
        b2 = m;
      }
      best1[m] = b1;
      best2[m] = b2;
    }
    double best_dc = -tie(now);  // a change must save more than rounding
    size_t first = none, second = none;
    for (size_t m = 0; m < moves.size() && moves[m].ds <= room; ++m) {
      if (moves[m].dc < best_dc) {
        best_dc = moves[m].dc;
        first = m;
        second = none;
      }
      // the partner: the cheapest change of another matrix that fits in what is left
      const double left = room - moves[m].ds;
      const auto end =
          std::upper_bound(moves.begin(), moves.end(), left, [](double v, const Move& mv) { return v < mv.ds; });
      if (end == moves.begin()) continue;
      const size_t last = static_cast<size_t>(end - moves.begin()) - 1;
      const size_t partner = moves[best1[last]].i != moves[m].i ? best1[last] : best2[last];
      if (partner != none && moves[m].dc + moves[partner].dc < best_dc) {
        best_dc = moves[m].dc + moves[partner].dc;
        first = m;
        second = partner;
      }
    }
    if (first == none) return;
    pick[moves[first].i] = moves[first].k;
    if (second != none) pick[moves[second].i] = moves[second].k;
  }
}

// The LP relaxation of the levels not chosen yet: a segment tree over all hull steps in the greedy's order, a step
// counting until its level is closed; the greedy is one descent, O(log steps) per bound.
class LpTree {
 public:
  LpTree(const std::vector<Step>& steps, size_t groups) : leaves_of_(groups) {
    while (size_ < std::max<size_t>(steps.size(), 1)) size_ *= 2;
    s_.assign(2 * size_, 0.0);
    c_.assign(2 * size_, 0.0);
    for (size_t k = 0; k < steps.size(); ++k) {
      s_[size_ + k] = steps[k].ds;
      c_[size_ + k] = steps[k].dc;
      leaves_of_[steps[k].group].push_back(k);
    }
    for (size_t i = size_ - 1; i >= 1; --i) pull(i);
  }

  // The group's configuration is chosen: its steps no longer count.
  void close(size_t group) {
    for (const size_t k : leaves_of_[group]) {
      size_t i = size_ + k;
      s_[i] = 0.0;
      c_[i] = 0.0;
      for (i /= 2; i >= 1; i /= 2) pull(i);
    }
  }

  // The least cost the open levels' steps add within `room` bits (>= 0), a fraction of one step allowed (< 0).
  double cost_within(double room) const {
    if (s_[1] <= room) return c_[1];
    size_t i = 1;
    double added = 0.0;
    while (i < size_) {
      const size_t left = 2 * i;
      if (s_[left] <= room) {
        room -= s_[left];
        added += c_[left];
        i = left + 1;
      } else {
        i = left;
      }
    }
    return s_[i] <= room ? added + c_[i] : added + c_[i] * (room / s_[i]);
  }

 private:
  void pull(size_t i) {
    s_[i] = s_[2 * i] + s_[2 * i + 1];
    c_[i] = c_[2 * i] + c_[2 * i + 1];
  }

  size_t size_ = 1;
  std::vector<double> s_, c_;
  std::vector<std::vector<size_t>> leaves_of_;
};

// Branch and bound, breadth first, with dominance (a dynamic program over Pareto fronts, as Nemhauser–Ullmann and
// Pisinger's knapsack algorithms): level k holds the partial allocations of the first k matrices left free, as
// (storage, cost) states. A state's children take each configuration of the next matrix; a child is cut when its
// bound (its cost + the LP of the matrices below within the budget left) cannot beat the incumbent by more than the
// gap asked for, or when a sibling or cousin dominates it (no more storage, no more cost: every completion of the one
// completes the other as cheaply). Dominance is what a depth-first search lacks: it keeps one state for the many
// orders of near-tie choices that reach the same storage and cost, and a depth-first search re-explores each of them.
class FrontSearch {
 public:
  FrontSearch(std::vector<Configs> levels, double room, double fixed_cost, double upper, double relative_gap,
              double tol_s)
      : levels_(std::move(levels)),
        n_(levels_.size()),
        room_(room),
        fixed_(fixed_cost),
        upper_(upper),
        gap_(relative_gap),
        tol_s_(tol_s),
        tree_(steps_of(levels_), n_) {
    min_s_below_.assign(n_ + 1, 0.0);
    first_c_below_.assign(n_ + 1, 0.0);
    for (size_t k = n_; k-- > 0;) {
      min_s_below_[k] = min_s_below_[k + 1] + levels_[k].front().s;
      first_c_below_[k] = first_c_below_[k + 1] + levels_[k].front().c;
    }
  }

  // Runs until every level is done (true: `best` is an allocation cheaper than `upper`, if one exists) or expanding
  // the next level would pass `max_nodes` states expanded in all (false).
  bool run(int64_t max_nodes) {
    std::vector<State> front{{0.0, 0.0, fixed_ + lp_below(0, room_)}}, next;
    for (size_t k = 0; k < n_; ++k) {
      // (a state's index must fit its children's 32-bit origin: a limit no memory would reach first)
      if (nodes_ + static_cast<int64_t>(front.size()) > max_nodes || front.size() > UINT32_MAX) {
        for (const auto& st : front) open_min_ = std::min(open_min_, st.bound);
        return false;
      }
      nodes_ += static_cast<int64_t>(front.size());
      tree_.close(k);
      expand(k, front, next);
      front.swap(next);
    }
    // the last level's states are whole allocations, their bound their cost; all cut ones cost at least the incumbent
    size_t best = front.size();
    for (size_t j = 0; j < front.size(); ++j) {
      if (front[j].bound < upper_ - tie(upper_) && (best == front.size() || front[j].bound < front[best].bound)) {
        best = j;
      }
    }
    if (best < front.size()) {
      upper_ = front[best].bound;
      best_.assign(n_, 0);
      for (size_t k = n_, j = best; k-- > 0;) {
        best_[k] = origin_[k][j].pos;
        j = origin_[k][j].parent;
      }
    }
    return true;
  }

  // Per level, the position (in its configurations) of the best allocation found; empty when none beat `upper`.
  const std::vector<size_t>& best() const { return best_; }
  // A lower bound on every allocation not beaten yet: the least bound cut by the gap or left open, or the incumbent.
  double open_bound() const { return std::min({upper_, cut_min_, open_min_}); }
  int64_t nodes() const { return nodes_; }

 private:
  struct State {
    double s, c, bound;  // storage and cost of the levels chosen (fixed matrices aside); its bound, fixed included
  };
  struct Origin {
    uint32_t parent, pos;  // the state of the level above, the configuration chosen
  };

  static std::vector<Step> steps_of(const std::vector<Configs>& levels) {
    std::vector<const Configs*> groups;
    for (const auto& l : levels) groups.push_back(&l);
    return hull_steps(groups);
  }

  double cut_at() const { return upper_ - std::max(gap_ * std::fabs(upper_), tie(upper_)); }

  // The LP bound of levels k.. (those open in the tree) within `room` bits; +inf when their smallest do not fit.
  double lp_below(size_t k, double room) const {
    if (k == n_) return room >= -tol_s_ ? 0.0 : kInf;
    const double extra = room - min_s_below_[k];
    if (extra < -tol_s_) return kInf;
    return first_c_below_[k] + tree_.cost_within(std::max(extra, 0.0));
  }

  // The children of `front` (sorted by storage, cost strictly decreasing) at level k, into `next` (the same order).
  // For each configuration, the children are `front` shifted, already in that order: a merge of those runs meets
  // candidates by storage, and one that costs no less than an earlier one is dominated.
  void expand(size_t k, const std::vector<State>& front, std::vector<State>& next) {
    const auto& cfgs = levels_[k];
    const double limit = room_ - min_s_below_[k + 1] + tol_s_;  // the most storage a child may have
    struct Run {
      size_t m, j, end;  // configuration, next state, past the last state that fits
    };
    std::vector<Run> runs;
    for (size_t m = 0; m < cfgs.size(); ++m) {
      size_t end = front.size();
      while (end > 0 && front[end - 1].s + cfgs[m].s > limit) --end;  // (storage increases along the front)
      if (end > 0) runs.push_back({m, 0, end});
    }
    auto after = [&](const Run& a, const Run& b) {  // heap order: least storage, then cost, then configuration
      const double sa = front[a.j].s + cfgs[a.m].s, sb = front[b.j].s + cfgs[b.m].s;
      if (sa != sb) return sa > sb;
      const double ca = front[a.j].c + cfgs[a.m].c, cb = front[b.j].c + cfgs[b.m].c;
      if (ca != cb) return ca > cb;
      return a.m > b.m;
    };
    std::make_heap(runs.begin(), runs.end(), after);
    next.clear();
    origin_.emplace_back();
    auto& origin = origin_.back();
    double least_c = kInf;  // of the candidates met so far (cut or kept): any later one costing as much is dominated
    const double cut = cut_at();
    while (!runs.empty()) {
      std::pop_heap(runs.begin(), runs.end(), after);
      Run& r = runs.back();
      const double s = front[r.j].s + cfgs[r.m].s, c = front[r.j].c + cfgs[r.m].c;
      if (c < least_c) {
        least_c = c;
        const double bound = fixed_ + c + lp_below(k + 1, room_ - s);
        if (bound >= cut) {
          cut_min_ = std::min(cut_min_, bound);
        } else {
          next.push_back({s, c, bound});
          origin.push_back({static_cast<uint32_t>(r.j), static_cast<uint32_t>(r.m)});
        }
      }
      if (++r.j < r.end) {
        std::push_heap(runs.begin(), runs.end(), after);
      } else {
        runs.pop_back();
      }
    }
  }

  std::vector<Configs> levels_;
  size_t n_;
  double room_, fixed_, upper_, gap_, tol_s_;
  double cut_min_ = kInf, open_min_ = kInf;
  std::vector<double> min_s_below_, first_c_below_;
  LpTree tree_;
  std::vector<std::vector<Origin>> origin_;  // per level, per state
  std::vector<size_t> best_;
  int64_t nodes_ = 0;
};

// The problem left after reduced-cost fixing: a configuration with rc > upper − L is in no allocation cheaper than the
// incumbent (whose own always stays). Matrices left with one configuration are fixed; the others are searched, those
// whose configurations span the most storage first, so that the last levels, fine-grained, fill what room is left.
struct Reduced {
  std::vector<Configs> kept;                    // per matrix, the configurations left
  std::vector<std::vector<size_t>> kept_index;  // their positions in the efficient list
  std::vector<size_t> order;                    // the matrices searched, in the search's order
  double fixed_cost = 0.0, fixed_s = 0.0;       // of the others
};

Reduced reduce(const std::vector<Configs>& eff, const RootLp& lp, const std::vector<size_t>& pick, double upper) {
  const size_t n = eff.size();
  const double rc_limit = upper - lp.lagrange + tie(upper) + tie(lp.lagrange);
  Reduced r;
  r.kept.resize(n);
  r.kept_index.resize(n);
  for (size_t i = 0; i < n; ++i) {
    for (size_t k = 0; k < eff[i].size(); ++k) {
      if (lp.reduced[i][k] > rc_limit && k != pick[i]) continue;
      r.kept[i].push_back(eff[i][k]);
      r.kept_index[i].push_back(k);
    }
    if (r.kept[i].size() == 1) {
      r.fixed_cost += r.kept[i][0].c;
      r.fixed_s += r.kept[i][0].s;
    } else {
      r.order.push_back(i);
    }
  }
  auto span = [&](size_t i) { return r.kept[i].back().s - r.kept[i].front().s; };
  std::stable_sort(r.order.begin(), r.order.end(), [&](size_t a, size_t b) { return span(a) > span(b); });
  return r;
}

void validate(const std::vector<std::vector<double>>& cost, const std::vector<std::vector<double>>& storage,
              double budget, const BitAllocationOptions& options) {
  TORCH_CHECK_VALUE(cost.size() == storage.size(), "allocate_bits: cost has ", cost.size(),
                    " matrices but storage has ", storage.size(), "; expected one row per matrix in both");
  TORCH_CHECK_VALUE(!cost.empty(), "allocate_bits: cost: expected at least one matrix, found none");
  for (size_t i = 0; i < cost.size(); ++i) {
    TORCH_CHECK_VALUE(!cost[i].empty(), "allocate_bits: cost[", i, "]: matrix ", i,
                      " has no configurations; expected at least one");
    TORCH_CHECK_VALUE(storage[i].size() == cost[i].size(), "allocate_bits: storage[", i, "]: expected ", cost[i].size(),
                      " configurations (as cost[", i, "] has), found ", storage[i].size());
    for (size_t k = 0; k < cost[i].size(); ++k) {
      TORCH_CHECK_VALUE(std::isfinite(cost[i][k]) && cost[i][k] >= 0.0, "allocate_bits: cost[", i, "][", k,
                        "]: expected a finite value >= 0, found ", num(cost[i][k]));
      TORCH_CHECK_VALUE(std::isfinite(storage[i][k]) && storage[i][k] > 0.0, "allocate_bits: storage[", i, "][", k,
                        "]: expected a finite number of bits > 0, found ", num(storage[i][k]));
    }
  }
  TORCH_CHECK_VALUE(std::isfinite(budget), "allocate_bits: budget: expected a finite number of bits, found ",
                    num(budget));
  TORCH_CHECK_VALUE(options.max_nodes() >= 1, "allocate_bits: max_nodes: expected at least 1, found ",
                    options.max_nodes());
  TORCH_CHECK_VALUE(std::isfinite(options.relative_gap()) && options.relative_gap() >= 0.0,
                    "allocate_bits: relative_gap: expected a finite value >= 0, found ", num(options.relative_gap()));
}

}  // namespace

BitAllocation allocate_bits(const std::vector<std::vector<double>>& cost,
                            const std::vector<std::vector<double>>& storage, double budget,
                            const BitAllocationOptions& options) {
  validate(cost, storage, budget, options);
  const size_t n = cost.size();
  std::vector<Configs> eff(n);
  double min_total = 0.0, useful_total = 0.0;
  for (size_t i = 0; i < n; ++i) {
    eff[i] = efficient(cost[i], storage[i]);
    min_total += eff[i].front().s;
    useful_total += eff[i].back().s;
  }
  const double tol_s = kRel * std::max(std::fabs(budget), useful_total);
  TORCH_CHECK_VALUE(budget >= min_total - tol_s, "allocate_bits: budget: ", num(budget),
                    " bits is below the smallest total storage, ", num(min_total),
                    " bits (every matrix at its smallest configuration); expected at least ", num(min_total), " (from ",
                    num(useful_total),
                    " bits on, every matrix has its least-cost configuration: a larger budget changes nothing)");

  // The LP bound and its multiplier; the incumbent (the LP solution rounded down, then a local search); the problem
  // reduced by the incumbent; the search, which either beats the incumbent with the optimum or proves it optimal.
  const RootLp lp = solve_root_lp(eff, budget, min_total);
  std::vector<size_t> pick = lp.rounded;  // the incumbent: positions into eff
  improve_locally(eff, pick, budget, tol_s);
  double upper = 0.0;
  for (size_t i = 0; i < n; ++i) upper += eff[i][pick[i]].c;
  const double root_bound = std::max({lp.value, lp.lagrange, 0.0});
  const double gap = options.relative_gap();

  BitAllocation result;
  double lower = root_bound;
  bool finished = true;
  if (root_bound < upper - std::max(gap * upper, tie(upper))) {
    const Reduced reduced = reduce(eff, lp, pick, upper);
    std::vector<Configs> levels;
    for (const size_t i : reduced.order) levels.push_back(reduced.kept[i]);
    FrontSearch search(std::move(levels), budget - reduced.fixed_s, reduced.fixed_cost, upper, gap, tol_s);
    finished = search.run(options.max_nodes());
    result.nodes = search.nodes();
    lower = std::max(root_bound, search.open_bound());
    if (!search.best().empty()) {
      for (size_t k = 0; k < reduced.order.size(); ++k) {
        const size_t i = reduced.order[k];
        pick[i] = reduced.kept_index[i][search.best()[k]];
      }
    }
  }
  for (size_t i = 0; i < n; ++i) result.choice.push_back(eff[i][pick[i]].index);

  for (size_t i = 0; i < n; ++i) {
    result.cost += cost[i][result.choice[i]];
    result.storage += storage[i][result.choice[i]];
  }
  // An exact search that finished cut nothing but by the incumbent itself (up to rounding): its bound is its cost.
  result.optimal = finished && (gap == 0.0 || lower >= result.cost - tie(result.cost));
  result.lower_bound = result.optimal ? result.cost : std::min(lower, result.cost);
  result.gap =
      (result.cost - result.lower_bound) / std::max(std::fabs(result.cost), std::numeric_limits<double>::min());
  return result;
}

}  // namespace lorafuse
