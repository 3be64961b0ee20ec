"""Core tensor network: the MPO graph, its sweeps, contraction plans and policies."""

from tnlm.core.budget import bond_bounds, max_bond_for_params, mpo_params
from tnlm.core.entropy import spectrum_entropy
from tnlm.core.factorize import factorize, padded_dim
from tnlm.core.mpo import MPO
from tnlm.core.plan import ContractionPlan, get_plan
from tnlm.core.policy import TruncationPolicy

__all__ = [
    "MPO",
    "ContractionPlan",
    "TruncationPolicy",
    "bond_bounds",
    "max_bond_for_params",
    "mpo_params",
    "factorize",
    "get_plan",
    "padded_dim",
    "spectrum_entropy",
]
