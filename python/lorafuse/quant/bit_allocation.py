"""LQ-LoRA's bit allocation: one quantization configuration per weight matrix, least total error within a
storage budget (a multiple-choice knapsack), solved exactly in C++ (lorafuse::allocate_bits)."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, List

import numpy as np
import torch

from .. import _C

DEFAULT_MAX_NODES = 10_000_000  #: lorafuse::BitAllocationOptions' default


@dataclass(frozen=True)
class BitAllocation:
    """What :func:`allocate_bits` chose and what it proved."""

    choice: List[int]  #: per matrix, the index of its configuration (into that matrix's row as given)
    cost: float  #: Σ cost of the choice
    storage: float  #: Σ storage of the choice, in bits (<= the budget)
    lower_bound: float  #: a proven lower bound on the least cost (== cost when optimal)
    gap: float  #: (cost - lower_bound) / cost; 0 when optimal
    optimal: bool  #: whether no allocation within the budget costs less (the search finished, no gap allowed)
    nodes: int  #: branch-and-bound nodes expanded


def _rows(name: str, table: Any) -> List[List[float]]:
    """``table`` (nested sequences, ragged allowed; a 2-D numpy array or tensor) as lists of floats."""
    if isinstance(table, (torch.Tensor, np.ndarray)) and table.dtype != object:
        if table.ndim != 2:
            raise ValueError(
                f"allocate_bits: {name}: expected a 2-D array (matrices x configurations), found "
                f"{table.ndim} dimensions of shape {tuple(table.shape)}"
            )
        if isinstance(table, torch.Tensor):
            return table.detach().to("cpu", torch.float64).tolist()
        return table.astype(np.float64).tolist()
    if isinstance(table, (str, bytes)):
        raise TypeError(f"allocate_bits: {name}: expected a sequence of rows of numbers, found a string")
    rows = []
    for i, row in enumerate(table):
        if isinstance(row, (torch.Tensor, np.ndarray)):
            row = row.tolist()
        if isinstance(row, (str, bytes)) or not hasattr(row, "__iter__"):
            raise TypeError(f"allocate_bits: {name}[{i}]: expected a row of numbers, found {row!r}")
        values = []
        for k, v in enumerate(row):
            if isinstance(v, (str, bytes)):
                raise TypeError(f"allocate_bits: {name}[{i}][{k}]: expected a number, found {v!r}")
            values.append(float(v))
        rows.append(values)
    return rows


def allocate_bits(
    cost: Any,
    storage: Any,
    budget: float,
    *,
    max_nodes: int = DEFAULT_MAX_NODES,
    relative_gap: float = 0.0,
) -> BitAllocation:
    """Chooses one configuration per weight matrix: matrix ``i`` with configuration ``c`` costs
    ``cost[i][c]`` (its decomposition error, finite, >= 0) and takes ``storage[i][c]`` bits (finite, > 0); the
    choice minimises Σ cost subject to Σ storage <= ``budget`` (total bits; LQ-LoRA's bit allocation, a
    multiple-choice knapsack).

    ``cost`` and ``storage``: nested sequences (rows may differ in length from matrix to matrix, not between
    the two), 2-D numpy arrays or tensors. Solved exactly by branch and bound over the LP relaxation's bound;
    ``max_nodes`` caps the search and ``relative_gap`` stops it once the choice is proven within that relative
    gap of the optimum (then ``optimal`` is False and ``lower_bound``/``gap`` say how close it is).
    Deterministic. ValueError naming the argument for mismatched or empty rows, values out of range, or a
    budget below the smallest total storage (the message gives that minimum and the largest useful budget).
    """
    if isinstance(budget, (str, bytes)):
        raise TypeError(f"allocate_bits: budget: expected a number of bits, found {budget!r}")
    choice, total_cost, total_storage, lower_bound, gap, optimal, nodes = _C._allocate_bits(
        _rows("cost", cost),
        _rows("storage", storage),
        float(budget),
        operator.index(max_nodes),
        float(relative_gap),
    )
    return BitAllocation(list(choice), total_cost, total_storage, lower_bound, gap, optimal, nodes)


__all__ = ["BitAllocation", "allocate_bits"]
