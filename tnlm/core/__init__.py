"""Core tensor network: the MPO graph, its sweeps, contraction plans, policies and budgets."""

from tnlm.core.budget import (
    Allocation,
    allocate_bonds,
    bond_bounds,
    check_fraction,
    max_bond_for_params,
    mpo_params,
    params_for_bonds,
    uniform_max_bond,
)
from tnlm.core.factorize import factorize, padded_dim
from tnlm.core.mpo import MPO
from tnlm.core.plan import ContractionPlan, apply_plan, dense_plan, gather_plan, get_plan
from tnlm.core.policy import TruncationPolicy
from tnlm.core.spectra import central_bond, spectrum_entropy, tail_sums

__all__ = [
    "MPO",
    "Allocation",
    "ContractionPlan",
    "TruncationPolicy",
    "allocate_bonds",
    "apply_plan",
    "bond_bounds",
    "central_bond",
    "check_fraction",
    "dense_plan",
    "factorize",
    "gather_plan",
    "get_plan",
    "max_bond_for_params",
    "mpo_params",
    "padded_dim",
    "params_for_bonds",
    "spectrum_entropy",
    "tail_sums",
    "uniform_max_bond",
]
