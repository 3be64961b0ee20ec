"""Parameter budgets (tnlm.core.budget): counts without decomposing, uniform caps for a
budget, and the global bond allocation across many MPOs."""

import numpy as np
import pytest

from tnlm import MPO
from tnlm.core import (
    allocate_bonds,
    bond_bounds,
    check_fraction,
    max_bond_for_params,
    mpo_params,
    params_for_bonds,
    uniform_max_bond,
)

from .conftest import rel_err
from .test_analysis import IN, OUT, structured


# ---------------------------------------------------------------- counts and caps
def test_budget_helpers_match_real_decompositions(rng):
    ins, outs = (2, 4, 4, 4, 3), (4, 4, 6, 4, 4)
    W = rng.standard_normal((384, 1536))
    exact = MPO.from_matrix(W, ins, outs)
    assert list(exact.bond_dims) == bond_bounds(ins, outs)
    assert exact.num_params == mpo_params(ins, outs)
    assert params_for_bonds(exact.bond_dims, ins, outs) == exact.num_params
    for chi in (1, 7, 50, 10_000):
        assert MPO.from_matrix(W, ins, outs, max_bond=chi).num_params == mpo_params(ins, outs, chi)
    budget = 147456
    chi = max_bond_for_params(ins, outs, budget)
    assert mpo_params(ins, outs, chi) <= budget < mpo_params(ins, outs, chi + 1)
    with pytest.raises(ValueError, match="budget 10 is below"):
        max_bond_for_params(ins, outs, 10)


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.5, 1.0])
def test_uniform_max_bond_is_the_largest_cap_within_the_fraction(fraction):
    ins, outs = (2, 4, 4, 4, 3), (4, 4, 6, 4, 4)  # 384 x 1536
    dense = 384 * 1536
    chi = uniform_max_bond(ins, outs, fraction)
    assert mpo_params(ins, outs, chi) <= fraction * dense < mpo_params(ins, outs, chi + 1)
    assert chi == max_bond_for_params(ins, outs, int(fraction * dense))


def test_uniform_max_bond_half_size_of_minilm_shapes():
    # what experiments/glue.py used for the 50% arms: budget I*J // 2
    from tnlm.core import factorize

    for I, J in ((384, 384), (384, 1536), (1536, 384)):
        ins, outs = factorize(I, 5), factorize(J, 5)
        assert uniform_max_bond(ins, outs, 0.5) == max_bond_for_params(ins, outs, I * J // 2)


def test_uniform_max_bond_padded_shapes_use_the_logical_size():
    ins, outs = (2, 4, 4), (2, 4, 4)  # 32 x 32 sites for a 30 x 26 matrix
    logical = uniform_max_bond(ins, outs, 0.5, dense_params=30 * 26)
    assert mpo_params(ins, outs, logical) <= 0.5 * 30 * 26 < mpo_params(ins, outs, logical + 1)
    assert logical < uniform_max_bond(ins, outs, 0.5)


def test_check_fraction_is_the_one_check_of_a_budget_fraction():
    assert check_fraction("budget", 1) == 1.0 and type(check_fraction("b", 1)) is float
    assert check_fraction("budget", np.float32(0.25)) == 0.25
    for bad in (0, -0.1, 1.5, float("nan"), float("inf"), np.float64(2.0)):
        with pytest.raises(ValueError, match=r"^budget must be a fraction in \(0, 1\], got"):
            check_fraction("budget", bad)
    for bad in ("0.5", True, np.bool_(True), None, [0.5]):
        with pytest.raises(TypeError, match=r"^fraction must be a number in \(0, 1\], got"):
            check_fraction("fraction", bad)


def test_every_budget_fraction_is_checked_by_it():
    from tnlm.compress.allocate import sensitivity_ranks, uniform_overrides

    msg = r"^fraction must be a fraction in \(0, 1\], got 1.5"
    with pytest.raises(ValueError, match=msg):
        uniform_max_bond((4, 4), (4, 4), 1.5)
    with pytest.raises(ValueError, match=msg):
        sensitivity_ranks({}, None, 1.5)
    with pytest.raises(ValueError, match=msg):
        uniform_overrides(None, None, 1.5)
    with pytest.raises(ValueError, match=r"^budget must be a fraction .* pass an int"):
        allocate_bonds({"a": MPO.from_matrix(np.eye(16), (4, 4), (4, 4))}, 1.5)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan"), float("inf")])
def test_uniform_max_bond_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        uniform_max_bond((4, 4), (4, 4), fraction)


def test_uniform_max_bond_bad_input():
    with pytest.raises(TypeError, match="fraction"):
        uniform_max_bond((4, 4), (4, 4), "0.5")
    with pytest.raises(TypeError, match="fraction"):
        uniform_max_bond((4, 4), (4, 4), True)
    with pytest.raises(ValueError, match="fraction=0.01 .*below the smallest MPO"):
        uniform_max_bond((4, 4), (4, 4), 0.01)  # 2.56 params, the smallest MPO has 32
    with pytest.raises(ValueError, match="dense_params"):
        uniform_max_bond((4, 4), (4, 4), 0.5, dense_params=0)
    with pytest.raises(TypeError, match="dense_params"):
        uniform_max_bond((4, 4), (4, 4), 0.5, dense_params=256.0)


# ---------------------------------------------------------------- allocation
@pytest.fixture
def module_mpos(rng):
    mats = {"random": rng.standard_normal((64, 48)), "structured": structured(rng, 1e-2)}
    return mats, {k: MPO.from_matrix(W, IN, OUT) for k, W in mats.items()}


def test_allocation_meets_budget_and_bounds_error(module_mpos):
    mats, mpos = module_mpos
    total_dense = 2 * 64 * 48
    alloc = allocate_bonds(mpos, 0.3)
    assert alloc.budget == int(0.3 * total_dense)
    assert alloc.total_params <= alloc.budget
    out = alloc.apply(mpos)
    for name, W in mats.items():
        assert out[name].bond_dims == tuple(alloc.max_bond[name])
        assert out[name].num_params == alloc.params[name]
        assert alloc.params[name] == params_for_bonds(alloc.max_bond[name], IN, OUT)
        measured = rel_err(out[name].to_matrix(), W)
        assert alloc.errors[name] >= measured - 1e-10
    # the structured matrix is cheap to compress: the random one gets the parameters
    assert alloc.params["random"] > alloc.params["structured"]
    assert alloc.errors["structured"] < 0.05
    bigger = allocate_bonds(mpos, 0.6)
    assert bigger.total_params > alloc.total_params
    assert bigger.total_sq_error < alloc.total_sq_error
    measured_sq = sum(rel_err(bigger.apply(mpos)[n].to_matrix(), mats[n]) ** 2 for n in mats)
    assert measured_sq < sum(rel_err(out[n].to_matrix(), mats[n]) ** 2 for n in mats)
    report = alloc.report()
    assert "random" in report and "structured" in report and f"{alloc.budget:,}" in report


def test_allocation_absolute_budget_and_full(module_mpos):
    _, mpos = module_mpos
    alloc = allocate_bonds(mpos, 1500, step=2)
    assert alloc.total_params <= 1500 and alloc.budget == 1500
    full = allocate_bonds(mpos, 1.0)  # exact MPOs (3472 params) exceed dense 3072: cuts needed
    assert alloc.total_params < full.total_params <= 2 * 3072
    assert full.errors["random"] < alloc.errors["random"]
    # already small MPOs fit: nothing is cut, the estimate is 0
    small = {k: m.truncate(max_bond=2) for k, m in mpos.items()}
    none_cut = allocate_bonds(small, 0.5)
    assert none_cut.max_bond == {k: [2, 2] for k in small}
    assert none_cut.total_params == 2 * params_for_bonds([2, 2], IN, OUT)
    assert max(none_cut.errors.values()) < 1e-7


@pytest.mark.parametrize("budget", [0, -5, 0.0, 1.5, float("nan"), 10**9, 50])
def test_allocation_bad_budget(module_mpos, budget):
    with pytest.raises(ValueError, match="budget"):
        allocate_bonds(module_mpos[1], budget)


def test_allocation_bad_mpos(module_mpos):
    with pytest.raises(ValueError, match="mpos"):
        allocate_bonds({}, 0.5)
    with pytest.raises(TypeError, match="mpos"):
        allocate_bonds({"a": np.eye(4)}, 0.5)
    alloc = allocate_bonds(module_mpos[1], 0.5)
    with pytest.raises(ValueError, match="mpos"):
        alloc.apply({"random": module_mpos[1]["random"]})


# ---------------------------------------------------------------- compression budgets
def test_uniform_ranks_meet_every_budget_down_to_the_smallest_model():
    from tnlm.compress.allocate import smallest_fraction, uniform_ranks

    shapes = {"q": (32, 32), "k": (32, 32), "up": (32, 64), "down": (64, 32), "thin": (2, 512)}
    total = sum(i * j for i, j in shapes.values())
    floor = smallest_fraction(shapes, "uniform")
    assert floor == sum(i + j for i, j in shapes.values()) / total
    for fraction in np.linspace(floor, 0.999, 60):
        ranks = uniform_ranks(shapes, float(fraction))
        kept = sum(ranks[n] * (i + j) for n, (i, j) in shapes.items())
        assert min(ranks.values()) >= 1 and kept <= fraction * total + 1e-9, fraction
    assert uniform_ranks(shapes, 1.0) == dict.fromkeys(shapes)  # nothing truncated
    with pytest.raises(ValueError, match="below the smallest model"):
        uniform_ranks(shapes, floor * 0.99)


def test_sensitivity_at_budget_one_keeps_every_layer_dense():
    from tnlm.compress.allocate import (
        FRACTION_GRID,
        Sensitivity,
        rank_for_fraction,
        sensitivity_ranks,
        smallest_fraction,
    )

    class Layer:  # what sensitivity_ranks reads of a WhitenedLayer
        def __init__(self, i, j):
            self.shape = (i, j)

    layers = {"encoder.layer.0.q": Layer(32, 32), "encoder.layer.0.up": Layer(32, 64)}
    # a drop measured as 0 (or below, by noise) once made budget 1 truncate to rank 1
    sens = Sensitivity(type_drops={"encoder.layer.*.q": {0.1: -1e-7, 0.5: 0.0},
                                   "encoder.layer.*.up": {0.1: 0.0, 0.5: 0.0}})
    assert sensitivity_ranks(layers, sens, 1.0) == dict.fromkeys(layers)
    shapes = {n: wl.shape for n, wl in layers.items()}
    low = min(FRACTION_GRID)
    assert smallest_fraction(shapes, "sensitivity") == sum(
        rank_for_fraction(i, j, low) * (i + j) for i, j in shapes.values()) / (32 * 32 + 32 * 64)


def test_a_types_drop_is_shared_among_the_blocks_that_hold_it():
    """Sensitivity.drop: a type measured with all its layers truncated shares its drop
    among those layers, not among all blocks (a type in one block of three, or a layer
    outside the blocks, keeps its whole drop)."""
    from tnlm.compress.allocate import Sensitivity

    blocks = {f"enc.{b}.q": b for b in range(3)} | {"enc.2.extra": 2, "pooler.dense": None}
    sens = Sensitivity(type_drops={"enc.*.q": {0.5: 0.3}, "enc.*.extra": {0.5: 0.3},
                                   "pooler.dense": {0.5: 0.2}},
                       block_drops={0: 0.1, 1: 0.1, 2: 0.1}, blocks=blocks)
    assert sens.drop("enc.0.q", 0.5) == pytest.approx(0.1)  # three blocks share 0.3
    assert sens.drop("enc.2.extra", 0.5) == pytest.approx(0.3)  # one block holds it
    assert sens.drop("pooler.dense", 0.5) == pytest.approx(0.2)  # outside the blocks
    assert sens.drop("enc.2.extra", 1.0) == 0.0
    # no blocks recorded: shared among the measured blocks, as before
    bare = Sensitivity(type_drops={"enc.*.q": {0.5: 0.3}}, block_drops={0: 0.1, 1: 0.1, 2: 0.1})
    assert bare.drop("enc.1.q", 0.5) == pytest.approx(0.1)
