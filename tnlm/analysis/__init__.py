"""Analysis of MPO decompositions: entanglement profiles, plots and drawings.

Depends only on :mod:`tnlm.core`, numpy, and (lazily) matplotlib / graphviz. The bond
allocation under a parameter budget is a budget policy: :func:`tnlm.core.allocate_bonds`.
"""

from tnlm.analysis.draw import ascii_diagram, render, to_dot
from tnlm.analysis.names import MODULE_TYPES, default_classifier
from tnlm.analysis.plots import (
    plot_entropy_heatmap,
    plot_entropy_profile,
    plot_error_vs_params,
    plot_spectra,
)
from tnlm.analysis.profile import (
    discarded_weight_curve,
    error_vs_params,
    matrix_profile,
    model_profile,
    model_profile_from_mpos,
    model_profile_from_rows,
    mpo_profile,
    nonfinite_reason,
    random_reference,
    reference_for,
)

__all__ = [
    "MODULE_TYPES",
    "ascii_diagram",
    "default_classifier",
    "discarded_weight_curve",
    "error_vs_params",
    "matrix_profile",
    "model_profile",
    "model_profile_from_mpos",
    "model_profile_from_rows",
    "mpo_profile",
    "nonfinite_reason",
    "plot_entropy_heatmap",
    "plot_entropy_profile",
    "plot_error_vs_params",
    "plot_spectra",
    "random_reference",
    "reference_for",
    "render",
    "to_dot",
]
