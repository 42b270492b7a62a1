"""lorafuse.allocate_bits (LQ-LoRA's bit allocation, lorafuse::allocate_bits) against scipy's MILP solver
(HiGHS): random instances with ragged configuration counts, many ties, LP-adversarial "big jump" instances,
one sized like SmolLM2's 210 weight matrices x 36 configurations; the node limit and gap; the input kinds; the
errors."""

import re
import time

import numpy as np
import pytest
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix

import lorafuse
from lorafuse import BitAllocation, allocate_bits

# HiGHS stops once its incumbent is within mip_abs_gap = 1e-6 (its default; scipy does not expose it) of its
# bound, so its objective may exceed the optimum by that much; mip_rel_gap is set to 0.
HIGHS_ABS_GAP = 1e-6
RTOL = 1e-9


def rx(*parts: str) -> str:
    """A regex matching the literal ``parts`` in this order (anything between them)."""
    return ".*".join(re.escape(p) for p in parts)


def highs(cost, storage, budget, unit=1.0, relaxed=False):
    """(choice, objective, dual bound) of the MILP: binary x[i][c], one per matrix, Σ storage·x <= budget.
    Storage in whole ``unit``s: the budget row then has integer coefficients, and an allocation over the
    budget by one unit is far outside HiGHS's feasibility tolerance. ``relaxed``: the LP relaxation's optimum
    instead (0 <= x <= 1)."""
    sizes = [len(r) for r in cost]
    c = np.concatenate([np.asarray(r, dtype=np.float64) for r in cost])
    s = np.concatenate([np.asarray(r, dtype=np.float64) for r in storage]) / unit
    assert np.array_equal(s, np.round(s)), "storage must be whole units"
    rows = np.repeat(np.arange(len(sizes)), sizes)
    one_each = csr_matrix((np.ones(len(c)), (rows, np.arange(len(c)))), shape=(len(sizes), len(c)))
    within = LinearConstraint(s[None, :], -np.inf, budget / unit if relaxed else np.floor(budget / unit))
    res = milp(
        c,
        constraints=[LinearConstraint(one_each, 1.0, 1.0), within],
        integrality=np.zeros(len(c)) if relaxed else np.ones(len(c)),
        bounds=Bounds(0.0, 1.0),
        options={"mip_rel_gap": 0.0, "time_limit": 120.0},
    )
    assert res.status == 0, res.message
    if relaxed:
        return res.fun
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    choice = [int(np.argmax(res.x[a : a + n])) for a, n in zip(starts, sizes)]
    objective = sum(cost[i][k] for i, k in enumerate(choice))
    assert sum(storage[i][k] for i, k in enumerate(choice)) <= budget
    return choice, objective, res.mip_dual_bound


def check_result(r: BitAllocation, cost, storage, budget):
    """r is a valid choice whose totals it reports, within the budget, with a bound below its cost."""
    assert isinstance(r, BitAllocation)
    assert len(r.choice) == len(cost)
    assert all(isinstance(k, int) and 0 <= k < len(row) for k, row in zip(r.choice, cost))
    assert r.cost == pytest.approx(sum(cost[i][k] for i, k in enumerate(r.choice)), rel=1e-12, abs=1e-12)
    assert r.storage == pytest.approx(sum(storage[i][k] for i, k in enumerate(r.choice)), rel=1e-12)
    assert r.storage <= budget * (1 + 1e-12)
    assert r.lower_bound <= r.cost
    assert r.gap == pytest.approx((r.cost - r.lower_bound) / max(abs(r.cost), 1e-300), abs=1e-15)


def check_against_highs(cost, storage, budget, **options):
    r = allocate_bits(cost, storage, budget, **options)
    check_result(r, cost, storage, budget)
    _, objective, dual_bound = highs(cost, storage, budget)
    assert r.optimal
    assert r.cost == pytest.approx(objective, rel=RTOL, abs=HIGHS_ABS_GAP)
    assert r.cost <= objective * (1 + RTOL)  # never worse than HiGHS's allocation
    assert r.cost >= dual_bound - RTOL * abs(dual_bound) - HIGHS_ABS_GAP
    assert r.lower_bound <= objective * (1 + RTOL)
    return r


def random_instance(rng, matrices, max_configs, *, integer=False, values=None):
    """Ragged rows: 1..max_configs configurations per matrix."""
    cost, storage = [], []
    for _ in range(matrices):
        k = int(rng.integers(1, max_configs + 1))
        if integer:
            cost.append([float(v) for v in rng.integers(0, values, k)])
            storage.append([float(v) for v in rng.integers(1, values, k)])
        else:
            storage.append([float(v) for v in rng.integers(1, 1000, k)])
            cost.append([float(v) for v in rng.uniform(0.0, 100.0, k)])
    return cost, storage


def budgets(storage, fractions):
    lo = sum(min(r) for r in storage)
    hi = sum(max(r) for r in storage)
    return [lo + f * (hi - lo) for f in fractions]


@pytest.mark.parametrize("matrices,max_configs", [(1, 6), (4, 5), (15, 8), (40, 12), (80, 20)])
def test_random_instances_equal_highs(matrices, max_configs):
    rng = np.random.default_rng(matrices * 1000 + max_configs)
    for _ in range(4):
        cost, storage = random_instance(rng, matrices, max_configs)
        for budget in budgets(storage, [0.0, 0.2, 0.5, 0.8, 1.0]):
            check_against_highs(cost, storage, budget)


@pytest.mark.parametrize("values", [3, 6])
def test_instances_with_many_ties_equal_highs(values):
    rng = np.random.default_rng(values)
    for _ in range(6):
        cost, storage = random_instance(rng, 30, 10, integer=True, values=values)
        for budget in budgets(storage, [0.0, 0.3, 0.6]):
            r = check_against_highs(cost, storage, budget)
            assert r.choice == allocate_bits(cost, storage, budget).choice  # deterministic


def big_jumps(rng, matrices):
    """Two configurations per matrix: a small costly one and a big jump in storage that costs almost nothing;
    the LP relaxation takes one jump in part, and rounding it down or up is far from the optimum."""
    w = np.round(rng.uniform(50, 150, matrices))
    storage = [[1.0, 1.0 + float(x)] for x in w]
    cost = [[float(x * rng.uniform(0.8, 1.2)), float(rng.uniform(0, 1))] for x in w]
    return cost, storage


@pytest.mark.parametrize("matrices", [10, 30, 50])
def test_lp_adversarial_big_jumps_equal_highs(matrices):
    rng = np.random.default_rng(matrices)
    for _ in range(3):
        cost, storage = big_jumps(rng, matrices)
        for budget in budgets(storage, [0.25, 0.5, 0.75]):
            check_against_highs(cost, storage, budget)


# SmolLM2-135M's 210 linear weights: 30 layers of q, k, v, o, gate, up, down
LLAMA_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30


def llama_instance(seed=0):
    """36 configurations (bits 2, 3, 4, 8 x first-level blocks 16, 32, 64 x second-level blocks 64, 128, 256,
    as LQ-LoRA's NF-b with double quantization); storage = numel x bits per weight; cost: a decomposition
    error that falls 4x per bit, a little with smaller blocks, times noise per matrix and configuration."""
    rng = np.random.default_rng(seed)
    configs = [(b, b0, b1) for b in (2, 3, 4, 8) for b0 in (16, 32, 64) for b1 in (64, 128, 256)]
    cost, storage = [], []
    for out_f, in_f in LLAMA_SHAPES:
        numel = out_f * in_f
        sensitivity = rng.lognormal(0.0, 0.5)
        cost.append([])
        storage.append([])
        for b, b0, b1 in configs:
            bits_per_weight = b + 8 / b0 + 32 / (b0 * b1)
            blocks = 1 + 0.1 * np.log2(b0 / 16) + 0.02 * np.log2(b1 / 64)
            error = numel * 1e-3 * sensitivity * 4.0 ** (-b) * blocks
            cost[-1].append(float(error * rng.lognormal(0.0, 0.03)))
            storage[-1].append(float(numel * bits_per_weight))
    return cost, storage, sum(o * i for o, i in LLAMA_SHAPES)


# every storage of llama_instance is a whole number of these: numels are multiples of 576 * 192 = 110592 bits
# and bits per weight multiples of 32 / (64 * 256) = 1 / 512 (all dyadic: the products are exact)
LLAMA_UNIT = 110592 / 512


@pytest.mark.parametrize("bits_per_weight", [2.5, 2.75, 3.0, 3.25])
def test_llama_sized_instance_equals_highs(bits_per_weight):
    cost, storage, numel = llama_instance()
    assert len(cost) == 210 and {len(r) for r in cost} == {36}
    budget = bits_per_weight * numel
    start = time.perf_counter()
    r = allocate_bits(cost, storage, budget)
    seconds = time.perf_counter() - start
    print(f"\n210 x 36 at {bits_per_weight} bits/weight: {seconds:.3f} s, {r.nodes} nodes, {r.optimal=}")
    check_result(r, cost, storage, budget)
    _, objective, _ = highs(cost, storage, budget, LLAMA_UNIT)
    assert r.optimal
    assert r.cost == pytest.approx(objective, rel=RTOL, abs=HIGHS_ABS_GAP)
    assert r.cost <= objective * (1 + RTOL)
    assert r.storage / numel <= bits_per_weight


def test_node_limit_and_gap_give_a_feasible_choice_and_a_valid_bound():
    rng = np.random.default_rng(17)
    limited = 0
    for _ in range(4):
        cost, storage = big_jumps(rng, 60)
        budget = budgets(storage, [0.4])[0]
        _, optimum, _ = highs(cost, storage, budget)
        relaxation = highs(cost, storage, budget, relaxed=True)
        exact = allocate_bits(cost, storage, budget)
        assert exact.optimal and exact.gap == 0.0 and exact.lower_bound == exact.cost
        for max_nodes in (1, 3, 10, 100):
            r = allocate_bits(cost, storage, budget, max_nodes=max_nodes)
            check_result(r, cost, storage, budget)
            assert r.nodes <= max_nodes
            assert r.lower_bound <= optimum * (1 + RTOL) <= r.cost * (1 + 2 * RTOL) + HIGHS_ABS_GAP
            assert r.lower_bound >= relaxation * (1 - RTOL)  # at least the LP relaxation's bound
            if exact.nodes > max_nodes:
                assert not r.optimal and r.gap > 0
                limited += 1
        for relative_gap in (0.1, 0.01):
            r = allocate_bits(cost, storage, budget, relative_gap=relative_gap)
            check_result(r, cost, storage, budget)
            assert r.gap <= relative_gap + 1e-12
            assert r.lower_bound <= optimum * (1 + RTOL)
    assert limited >= 8  # the limit really cut searches short


def test_input_kinds_give_the_same_allocation():
    cost, storage, _ = llama_instance(seed=3)
    cost, storage = cost[:20], storage[:20]
    budget = 3.0 * sum(o * i for o, i in LLAMA_SHAPES[:20])
    reference = allocate_bits(cost, storage, budget)
    assert reference.optimal
    as_tensor = lambda t: torch.tensor(t, dtype=torch.float64)  # noqa: E731
    for kind in (np.asarray, as_tensor, lambda t: tuple(tuple(r) for r in t)):
        r = allocate_bits(kind(cost), kind(storage), budget)
        assert r == reference
    # float32 tensors are read as they are (their values rounded to float32)
    cost32, storage32 = (np.asarray(t, dtype=np.float32) for t in (cost, storage))
    r = allocate_bits(torch.from_numpy(cost32), storage32, budget)
    check_result(r, cost32.astype(np.float64).tolist(), storage32.astype(np.float64).tolist(), budget)
    ragged_cost = [cost[0][:3], cost[1], cost[2][:1]]
    ragged_storage = [np.asarray(storage[0][:3]), as_tensor(storage[1]), storage[2][:1]]
    budget = storage[0][2] + storage[1][5] + storage[2][0]
    r = allocate_bits(ragged_cost, ragged_storage, budget)
    check_result(r, ragged_cost, [storage[0][:3], storage[1], storage[2][:1]], budget)
    assert r.optimal and len(r.choice) == 3
    assert lorafuse.quant.allocate_bits is allocate_bits and lorafuse.BitAllocation is BitAllocation


def test_budget_at_the_least_and_above_the_largest_useful_storage():
    cost = [[5.0, 1.0, 0.5], [3.0, 2.0, 0.0], [7.0, 7.0, 1.0]]
    storage = [[1.5, 3.0, 6.0], [2.0, 2.0, 9.0], [4.0, 4.0, 5.0]]
    r = allocate_bits(cost, storage, 7.5)
    assert (r.choice, r.cost, r.storage, r.optimal) == ([0, 1, 0], 14.0, 7.5, True)
    r = allocate_bits(cost, storage, 1e6)
    assert (r.choice, r.cost, r.storage, r.optimal, r.nodes) == ([2, 2, 2], 1.5, 20.0, True, 0)


GOOD_COST = [[1.0, 0.5], [2.0, 1.0, 0.0]]
GOOD_STORAGE = [[2.0, 4.0], [2.0, 3.0, 8.0]]


@pytest.mark.parametrize(
    "cost,storage,budget,options,match",
    [
        (GOOD_COST, [[2.0, 4.0]], 10.0, {}, rx("cost has 2 matrices but storage has 1", "one row per")),
        ([], [], 10.0, {}, rx("cost", "at least one matrix", "found none")),
        ([[1.0], []], [[1.0], []], 10.0, {}, rx("cost[1]", "no configurations", "expected at least one")),
        (GOOD_COST, [[2.0, 4.0], [2.0, 3.0]], 10.0, {}, rx("storage[1]", "expected 3 config", "found 2")),
        ([[1.0, float("nan")], [2.0, 1.0, 0.0]], GOOD_STORAGE, 10.0, {}, rx("cost[0][1]", "found nan")),
        ([[1.0, 0.5], [2.0, -1.0, 0.0]], GOOD_STORAGE, 10.0, {}, rx("cost[1][1]", ">= 0", "found -1")),
        (GOOD_COST, [[2.0, 0.0], [2.0, 3.0, 8.0]], 10.0, {}, rx("storage[0][1]", "> 0", "found 0")),
        (GOOD_COST, [[2.0, 4.0], [2.0, float("inf"), 8.0]], 10.0, {}, rx("storage[1][1]", "found inf")),
        (GOOD_COST, GOOD_STORAGE, float("inf"), {}, rx("budget", "finite number of bits", "found inf")),
        (
            GOOD_COST,
            GOOD_STORAGE,
            3.5,
            {},
            rx("budget: 3.5 bits is below the smallest total storage, 4 bits", "least 4", "from 12 bits on"),
        ),
        (GOOD_COST, GOOD_STORAGE, 10.0, {"max_nodes": 0}, rx("max_nodes", "at least 1", "found 0")),
        (GOOD_COST, GOOD_STORAGE, 10.0, {"relative_gap": -0.5}, rx("relative_gap", ">= 0", "found -0.5")),
        (np.ones((2, 3, 1)), np.ones((2, 3, 1)), 10.0, {}, rx("cost", "2-D", "found 3 dimensions")),
    ],
)
def test_errors_are_value_errors_naming_the_argument(cost, storage, budget, options, match):
    with pytest.raises(ValueError, match=match) as caught:
        allocate_bits(cost, storage, budget, **options)
    assert type(caught.value) is ValueError
    assert "allocate_bits" in str(caught.value)


def test_wrong_types_are_type_errors():
    with pytest.raises(TypeError, match=rx("cost[0][1]", "expected a number", "'x'")):
        allocate_bits([[1.0, "x"]], [[1.0, 2.0]], 3.0)
    with pytest.raises(TypeError, match=rx("storage[0]", "expected a row of numbers", "2.0")):
        allocate_bits([[1.0]], [2.0], 3.0)
    with pytest.raises(TypeError):
        allocate_bits([[1.0]], [[2.0]], 3.0, max_nodes=1.5)
