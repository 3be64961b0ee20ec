"""The analysis layer: profiles, error curves, drawings and plots."""

import matplotlib

matplotlib.use("Agg")

import shutil  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from tnlm import MPO  # noqa: E402
from tnlm.analysis import (  # noqa: E402
    ascii_diagram,
    default_classifier,
    discarded_weight_curve,
    error_vs_params,
    matrix_profile,
    model_profile,
    mpo_profile,
    plot_entropy_heatmap,
    plot_entropy_profile,
    plot_error_vs_params,
    plot_spectra,
    random_reference,
    reference_for,
    render,
    to_dot,
)
from tnlm.analysis import draw as draw_module  # noqa: E402

from .conftest import rel_err  # noqa: E402

IN, OUT = (4, 4, 4), (4, 4, 3)  # 64 x 48


def structured(rng, noise=1e-3):
    """64 x 48 with MPO bond dims <= 2 (sum of two Kronecker products) plus a little noise."""
    W = sum(
        np.kron(
            np.kron(rng.standard_normal((4, 4)), rng.standard_normal((4, 4))),
            rng.standard_normal((4, 3)),
        )
        for _ in range(2)
    )
    return W + noise * np.linalg.norm(W) / np.sqrt(W.size) * rng.standard_normal(W.shape)


def unfolding_spectrum(W, bond):
    """Singular values of W (64 x 48, sites IN x OUT) unfolded at ``bond``, computed directly."""
    n = len(IN)
    t = W.reshape(*IN, *OUT).transpose([a for k in range(n) for a in (k, n + k)])
    rows = int(np.prod([IN[k] * OUT[k] for k in range(bond + 1)]))
    return np.linalg.svd(t.reshape(rows, -1), compute_uv=False)


# ---------------------------------------------------------------- profiles
def test_matrix_profile_matches_mpo(rng):
    W = rng.standard_normal((64, 48))
    prof = matrix_profile(W, IN, OUT, name="w")
    mpo = MPO.from_matrix(W, IN, OUT)
    np.testing.assert_allclose(prof["entropies"], mpo.entanglement_entropy(), rtol=1e-10)
    assert prof["bond_dims"] == mpo.bond_dims == (16, 12)
    assert prof["num_params"] == mpo.num_params
    assert prof["central_fraction"] == pytest.approx(mpo.site_params[1] / mpo.num_params)
    assert prof["norm"] == pytest.approx(np.linalg.norm(W))
    for k, s in enumerate(prof["spectra"]):
        np.testing.assert_allclose(s, unfolding_spectrum(W, k)[: len(s)], rtol=1e-9)
    np.testing.assert_allclose(prof["max_entropies"], np.log([16, 12]))
    assert prof["central_bond"] == mpo.central_bond == 0  # 16 > 12, left of T1
    assert prof["central_entropy"] == prof["entropies"][0]
    # orientation does not matter with default shapes
    np.testing.assert_allclose(
        matrix_profile(W.T, OUT, IN)["entropies"], prof["entropies"], rtol=1e-10
    )


def test_random_reference_is_more_entangled(rng):
    W = structured(rng)
    prof = matrix_profile(W, IN, OUT)
    ref = reference_for(prof, seed=3)
    assert ref["norm"] == pytest.approx(prof["norm"])
    assert ref["shape"] == (64, 48) and ref["in_shape"] == IN
    assert ref["central_entropy"] > prof["central_entropy"] + 1.0
    assert all(r > p for r, p in zip(ref["entropies"], prof["entropies"]))
    again = random_reference((64, 48), IN, OUT, seed=3, norm=prof["norm"])
    np.testing.assert_allclose(again["entropies"], ref["entropies"])


def test_discarded_weight_curve(rng):
    W = rng.standard_normal((64, 48))
    mpo = MPO.from_matrix(W, IN, OUT)
    chi, eps = discarded_weight_curve(mpo)  # central bond = 0 (dim 16)
    assert list(chi) == list(range(1, 17))
    assert np.all(np.diff(eps) < 0) and eps[-1] == 0.0
    s = unfolding_spectrum(W, 0)
    assert eps[0] == pytest.approx(np.sqrt(1 - s[0] ** 2 / np.sum(s**2)))
    # cutting that bond alone to chi has exactly this error (Eckart-Young)
    for c in (3, 9):
        cut = mpo.truncate(max_bond=[c, 12])
        assert rel_err(cut.to_matrix(), W) == pytest.approx(eps[c - 1], rel=1e-8)
    chi1, eps1 = discarded_weight_curve(mpo, bond=1)
    assert len(chi1) == 12 and eps1[-1] == 0.0
    with pytest.raises(ValueError, match="bond"):
        discarded_weight_curve(mpo, bond=5)


def test_error_vs_params_matches_eckart_young(rng):
    W = rng.standard_normal((64, 48))
    rows = error_vs_params(W, IN, OUT, [1, 2, 4, 8, 16])
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    for row in rows:
        r = row["svd_rank"]
        assert row["svd_params"] == r * (64 + 48) <= row["params"]
        assert r == min(row["params"] // 112, 48)
        W_r = (U[:, :r] * S[:r]) @ Vt[:r]
        assert row["svd_error"] == pytest.approx(rel_err(W_r, W), abs=1e-12)
        mpo = MPO.from_matrix(W, IN, OUT).truncate(max_bond=row["max_bond"])
        assert row["params"] == mpo.num_params
        assert row["mpo_error"] == pytest.approx(rel_err(mpo.to_matrix(), W), rel=1e-6, abs=1e-12)
    assert rows[-1]["mpo_error"] < 1e-12  # full bonds: exact
    errs = [row["mpo_error"] for row in rows]
    assert errs == sorted(errs, reverse=True)
    with pytest.raises(ValueError, match="max_bonds"):
        error_vs_params(W, IN, OUT, [])
    with pytest.raises(ValueError, match="max_bonds"):
        error_vs_params(W, IN, OUT, [4, 0])


# ---------------------------------------------------------------- model profile
@pytest.mark.parametrize(
    "name, expected",
    [
        ("encoder.layer.3.attention.self.query.weight", (3, "Q")),
        ("bert.encoder.layer.11.attention.self.key", (11, "K")),
        ("encoder.layer.0.attention.self.value", (0, "V")),
        ("encoder.layer.2.attention.output.dense.weight", (2, "O")),
        ("encoder.layer.2.intermediate.dense", (2, "FFN-in")),
        ("encoder.layer.2.output.dense", (2, "FFN-out")),
        ("embeddings.word_embeddings.weight", (None, "embedding")),
        ("pooler.dense.weight", (None, "other")),
        ("distilbert.transformer.layer.4.attention.out_lin", (4, "O")),
        ("distilbert.transformer.layer.4.ffn.lin2", (4, "FFN-out")),
        ("albert.encoder.albert_layer_groups.0.albert_layers.0.attention.dense", (0, "O")),
        ("albert.encoder.albert_layer_groups.0.albert_layers.0.ffn", (0, "FFN-in")),
        ("albert.encoder.albert_layer_groups.0.albert_layers.0.ffn_output", (0, "FFN-out")),
        ("transformer.h.5.attn.c_attn.weight", (5, "QKV")),
        ("transformer.h.5.attn.c_proj", (5, "O")),
        ("transformer.h.5.mlp.c_fc", (5, "FFN-in")),
        ("transformer.h.5.mlp.c_proj", (5, "FFN-out")),
        ("transformer.wte.weight", (None, "embedding")),
    ],
)
def test_default_classifier(name, expected):
    assert default_classifier(name) == expected


def test_default_classifier_knows_every_block_stack_and_default_target():
    """The name-based classifier (no model at hand) keeps up with the architectures
    tnlm knows: the layer of every default target inside every block stack."""
    from tnlm.integration.architectures import ARCHITECTURES

    for arch in ARCHITECTURES.values():
        for target in arch.targets:
            name = f"model.{arch.blocks}.3.{target}.weight"
            layer, kind = default_classifier(name)
            assert layer == 3 and kind != "other", (arch.name, name, kind)


def test_model_profile_grid(rng):
    weights = {
        "encoder.layer.0.attention.self.query.weight": structured(rng),
        "encoder.layer.0.intermediate.dense.weight": rng.standard_normal((64, 48)),
        "encoder.layer.1.attention.self.query.weight": rng.standard_normal((64, 48)),
        "encoder.layer.1.attention.self.query.bias": rng.standard_normal(48),  # skipped: 1-D
    }
    mp = model_profile(weights, n_sites=3)
    assert len(mp["rows"]) == 3 and mp["skipped"] == []
    assert mp["layers"] == [0, 1] and mp["types"] == ["Q", "FFN-in"]
    grid = mp["entropy"]
    assert grid.shape == (2, 2) and np.isnan(grid[1, 1])
    row0 = mp["rows"][0]
    assert grid[0, 0] == pytest.approx(row0["central_entropy"])
    assert grid[0, 0] < grid[1, 0]  # structured < random
    assert np.nanmax(mp["normalized_entropy"]) <= 1.0
    with pytest.raises(ValueError, match="named_weights"):
        model_profile({})
    with pytest.raises(ValueError, match="named_weights"):
        model_profile({"a.bias": np.ones(3)})


def test_minilm_profile(minilm_weights):
    names = [
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.0.attention.self.key.weight",
    ]
    mp = model_profile({n: minilm_weights[n].T for n in names})
    assert [r["type"] for r in mp["rows"]] == ["Q", "K"] and mp["layers"] == [0]
    for row in mp["rows"]:
        assert row["shape"] == (384, 384) and row["n_sites"] == 5
        ent, top = np.array(row["entropies"]), np.array(row["max_entropies"])
        assert np.all(ent > 0) and np.all(ent <= top + 1e-9)
        assert row["central_fraction"] > 0.5
        assert row["norm"] == pytest.approx(np.linalg.norm(minilm_weights[row["name"]]), rel=1e-5)


# ---------------------------------------------------------------- drawings
def test_to_dot_and_ascii(rng):
    mpo = MPO.from_matrix(rng.standard_normal((64, 48)), IN, OUT, max_bond=[10, 7])
    dot = to_dot(mpo, name="query")
    assert dot.startswith('graph "query" {')
    for node in ("T0", "T1", "T2"):
        assert f'"{node}"' in dot
    assert '"T0" -- "T1" [label="10"' in dot and '"T1" -- "T2" [label="7"' in dot
    assert "T1 (central)" in dot and "fillcolor" in dot
    for k, (i, j) in enumerate(zip(IN, OUT)):
        assert f'xlabel="i{k}={i}"' in dot and f'xlabel="j{k}={j}"' in dot
    art = ascii_diagram(mpo)
    lines = art.splitlines()
    assert "[T0]" in lines[2] and "[*T1*]" in lines[2] and "[T2]" in lines[2]
    assert "--10--" in lines[2] and "-7-" in lines[2]
    assert "i2=4" in lines[0] and "j2=3" in lines[4]
    # the legs sit under the labels' columns
    assert lines[1].index("|") == lines[3].index("|")


def test_render_without_dot(rng, monkeypatch, tmp_path):
    mpo = MPO.from_matrix(rng.standard_normal((64, 48)), IN, OUT)
    monkeypatch.setattr(draw_module.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="graphviz") as err:
        render(mpo, tmp_path / "mpo.svg")
    assert "to_dot()" in str(err.value)


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz 'dot' not installed")
def test_render_with_dot(rng, tmp_path):
    mpo = MPO.from_matrix(rng.standard_normal((64, 48)), IN, OUT)
    path = render(mpo, tmp_path / "mpo.svg")
    assert path.is_file() and "<svg" in path.read_text()


# ---------------------------------------------------------------- plots
def test_plots_return_figures(rng):
    W = rng.standard_normal((64, 48))
    mpo = MPO.from_matrix(W, IN, OUT)
    fig = plot_spectra(mpo)
    assert isinstance(fig, Figure) and len(fig.axes) == 1 and len(fig.axes[0].lines) == 2
    prof = mpo_profile(mpo, "w")
    fig = plot_entropy_profile(prof, reference="random")
    assert isinstance(fig, Figure) and len(fig.axes[0].lines) == 3
    assert len(plot_entropy_profile(mpo).axes[0].lines) == 2
    mp = model_profile(
        {"encoder.layer.0.attention.self.query": W, "encoder.layer.1.output.dense": W}, n_sites=3
    )
    fig = plot_entropy_heatmap(mp)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    fig = plot_error_vs_params(error_vs_params(W, IN, OUT, [2, 4, 8]))
    assert isinstance(fig, Figure) and len(fig.axes[0].lines) == 2
    with pytest.raises(TypeError, match="mpo_or_profile"):
        plot_spectra(W)
    with pytest.raises(ValueError, match="reference"):
        plot_entropy_profile(prof, reference="gaussian")
