"""Analysis of MPO decompositions: entanglement profiles, plots, drawings, bond allocation.

Depends only on :mod:`tnlm.core`, numpy, and (lazily) matplotlib / graphviz.
"""

from tnlm.analysis.allocation import Allocation, allocate_bonds, params_for_bonds
from tnlm.analysis.draw import ascii_diagram, render, to_dot
from tnlm.analysis.names import MODULE_TYPES, default_classifier
from tnlm.analysis.plots import (
    plot_entropy_heatmap,
    plot_entropy_profile,
    plot_error_vs_params,
    plot_spectra,
)
from tnlm.analysis.profile import (
    central_bond,
    discarded_weight_curve,
    error_vs_params,
    matrix_profile,
    model_profile,
    model_profile_from_rows,
    mpo_profile,
    random_reference,
    reference_for,
)

__all__ = [
    "MODULE_TYPES",
    "Allocation",
    "allocate_bonds",
    "ascii_diagram",
    "central_bond",
    "default_classifier",
    "discarded_weight_curve",
    "error_vs_params",
    "matrix_profile",
    "model_profile",
    "model_profile_from_rows",
    "mpo_profile",
    "params_for_bonds",
    "plot_entropy_heatmap",
    "plot_entropy_profile",
    "plot_error_vs_params",
    "plot_spectra",
    "random_reference",
    "reference_for",
    "render",
    "to_dot",
]
