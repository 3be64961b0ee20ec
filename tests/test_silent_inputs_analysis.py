"""Inputs of the analysis layer (profiles, plots, drawings) and of the spectra and sweep
helpers below it that were once accepted silently, gave a wrong result or failed late with
an obscure error: each is now refused early, naming the argument and what was expected,
or gives the correct result."""

import matplotlib

matplotlib.use("Agg")

import json  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from tnlm import MPO  # noqa: E402
from tnlm.analysis import (  # noqa: E402
    error_vs_params,
    model_profile,
    model_profile_from_rows,
    mpo_profile,
    plot_error_vs_params,
    plot_spectra,
    random_reference,
    render,
)
from tnlm.core import sweeps  # noqa: E402
from tnlm.core.spectra import spectrum_entropy, tail_sums  # noqa: E402

IN, OUT = (4, 4, 4), (4, 4, 3)  # 64 x 48


def small_mpo(seed=0):
    W = np.random.default_rng(seed).standard_normal((64, 48))
    return W, MPO.from_matrix(W, IN, OUT)


FAKE_DOT = """#!{python}
import sys
args = sys.argv[1:]
fmt = next(a[2:] for a in args if a.startswith("-T"))
out = args[args.index("-o") + 1]
with open(out, "w") as f:
    f.write("FAKE " + fmt + "\\n")
    {fail}
    f.write(open(args[-1]).read())
"""


@pytest.fixture
def fake_dot(tmp_path, monkeypatch):
    """A stand-in for graphviz's ``dot`` on PATH: writes ``FAKE <format>`` and the DOT
    source to the ``-o`` file; ``fake_dot(fail=True)`` writes half a file and exits 1."""
    pytest.importorskip("graphviz")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    def install(fail=False):
        script = bin_dir / "dot"
        script.write_text(FAKE_DOT.format(python=sys.executable,
                                          fail="sys.exit(1)" if fail else "pass"))
        script.chmod(0o755)

    install()
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ.get('PATH', '')}")
    return install


# ------------------------------------------------------------------ drawings
def test_render_takes_the_format_from_the_suffix_and_keeps_the_files_beside_it(
        tmp_path, fake_dot):
    _, mpo = small_mpo()
    out = tmp_path / "figs"
    out.mkdir()
    (out / "mpo.gv").write_text("the user's own DOT file\n")
    # "mpo.png" held an SVG (format defaulted to svg), and mpo.gv beside it was
    # overwritten by graphviz's source file and then deleted
    assert render(mpo, out / "mpo.png") == out / "mpo.png"
    assert (out / "mpo.png").read_text().startswith("FAKE png\n")
    assert (out / "mpo.gv").read_text() == "the user's own DOT file\n"
    assert render(mpo, out / "mpo.svg").read_text().startswith("FAKE svg\n")
    assert render(mpo, out / "plain").read_text().startswith("FAKE svg\n")  # no suffix: svg
    assert render(mpo, out / "x.pdf", format="pdf").read_text().startswith("FAKE pdf\n")
    assert sorted(p.name for p in out.iterdir()) == ["mpo.gv", "mpo.png", "mpo.svg", "plain",
                                                     "x.pdf"]
    # a format the suffix contradicts, a suffix naming no format, a bad format: refused
    with pytest.raises(ValueError, match=r"names format 'png' but format is 'svg'"):
        render(mpo, out / "other.png", format="svg")
    with pytest.raises(ValueError, match=r"suffix \.txt"):
        render(mpo, out / "other.txt")
    with pytest.raises(ValueError, match="format must be a graphviz output format"):
        render(mpo, out / "other", format="bogus")
    with pytest.raises(TypeError, match="format must be a str"):
        render(mpo, out / "other", format=3)
    assert not any(p.name.startswith("other") for p in out.iterdir())


def test_render_leaves_an_existing_file_as_it_was_when_dot_fails(tmp_path, fake_dot):
    _, mpo = small_mpo()
    target = tmp_path / "mpo.svg"
    target.write_text("the previous drawing\n")
    fake_dot(fail=True)
    with pytest.raises(Exception, match="exit status 1"):
        render(mpo, target)
    assert target.read_text() == "the previous drawing\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "mpo.svg"]


def test_render_takes_a_format_spelled_two_ways_writes_through_links_and_keeps_modes(
        tmp_path, fake_dot):
    import os

    _, mpo = small_mpo()
    assert render(mpo, tmp_path / "a.jpg", format="jpeg").read_text().startswith("FAKE jpeg")
    assert render(mpo, tmp_path / "a.tif", format="tiff").read_text().startswith("FAKE tiff")
    target = tmp_path / "drawing.svg"
    target.write_text("old\n")
    target.chmod(0o664)
    link = tmp_path / "link.svg"
    link.symlink_to(target)
    render(mpo, link)
    assert link.is_symlink() and target.read_text().startswith("FAKE svg")
    assert os.stat(target).st_mode & 0o777 == 0o664


# ------------------------------------------------------------------ plots
def test_plot_spectra_draws_a_profile_read_back_from_json():
    _, mpo = small_mpo()
    prof = mpo_profile(mpo, "w")
    back = json.loads(json.dumps({**prof, "spectra": [s.tolist() for s in prof["spectra"]]}))
    fig = plot_spectra(back)  # was: TypeError '>' not supported between list and int
    assert isinstance(fig, Figure)
    want = [line.get_ydata() for line in plot_spectra(prof).axes[0].lines]
    got = [line.get_ydata() for line in fig.axes[0].lines]
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w)


def test_plot_error_vs_params_reads_an_iterable_once_and_refuses_a_single_row():
    W, _ = small_mpo()
    rows = error_vs_params(W, IN, OUT, [2, 4])
    # a generator: both lines drawn (was: "x and y must have same first dimension")
    fig = plot_error_vs_params(r for r in rows)
    assert [len(line.get_xdata()) for line in fig.axes[0].lines] == [2, 2]
    with pytest.raises(TypeError, match="wrap a single row in a list"):
        plot_error_vs_params(rows[0])  # was: "string indices must be integers"
    with pytest.raises(TypeError, match=r"rows\[1\] must be an error_vs_params row"):
        plot_error_vs_params([rows[0], {"params": 3}])
    with pytest.raises(ValueError, match="rows is empty"):
        plot_error_vs_params(iter([]))


# ------------------------------------------------------------------ profiles
def test_random_reference_refuses_a_bool_seed_and_a_norm_that_is_not_a_number():
    with pytest.raises(TypeError, match="seed must be an int"):
        random_reference((64, 48), IN, OUT, seed=True)  # was: seed 1
    with pytest.raises(TypeError, match="seed must be an int"):
        random_reference((64, 48), IN, OUT, seed=1.5)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        random_reference((64, 48), IN, OUT, seed=-1)
    with pytest.raises(TypeError, match="norm must be a number"):
        random_reference((64, 48), IN, OUT, norm=True)  # was: norm 1.0
    with pytest.raises(TypeError, match="norm must be a number"):
        random_reference((64, 48), IN, OUT, norm="2")  # was: a TypeError of np.isfinite
    with pytest.raises(ValueError, match="norm must be a finite number > 0"):
        random_reference((64, 48), IN, OUT, norm=float("nan"))
    with pytest.raises(TypeError, match=r"shape must be a pair of ints"):
        random_reference(64)  # was: "object of type 'int' has no len()"
    ref = random_reference((64, 48), IN, OUT, seed=np.int64(3), norm=np.float32(2.0))
    assert ref["norm"] == pytest.approx(2.0)
    assert ref["entropies"] == random_reference((64, 48), IN, OUT, seed=3)["entropies"]


def test_model_profile_refuses_a_classifier_that_does_not_give_an_int_layer_and_a_type():
    W, _ = small_mpo()
    names = {f"blocks.{k}.query": W for k in (2, 10)}

    def str_layers(name):  # the regex group, not converted to int
        return name.split(".")[1], "Q"

    # the layers sorted as strings, "10" before "2": the heatmap's rows silently out of order
    with pytest.raises(TypeError, match=r"classify\('blocks.2.query'\) gave layer '2'"):
        model_profile(names, str_layers, n_sites=3)
    with pytest.raises(TypeError, match=r"must return \(layer, module_type\), got 'Q'"):
        model_profile(names, lambda name: "Q", n_sites=3)  # was: "not enough values to unpack"
    with pytest.raises(TypeError, match="gave layer True"):
        model_profile(names, lambda name: (True, "Q"), n_sites=3)
    with pytest.raises(TypeError, match="gave module_type 3"):
        model_profile(names, lambda name: (1, 3), n_sites=3)
    with pytest.raises(TypeError, match="classify must be a function"):
        model_profile(names, None, n_sites=3)
    mp = model_profile(names, lambda name: (np.int64(name.split(".")[1]), "Q"), n_sites=3)
    assert mp["layers"] == [2, 10] and mp["types"] == ["Q"]
    # rows that carry their layer and type need no name
    rows = [{k: v for k, v in r.items() if k != "name"} for r in mp["rows"]]
    assert model_profile_from_rows(rows)["layers"] == [2, 10]


# ------------------------------------------------------------------ core: spectra and sweeps
def test_spectrum_entropy_and_tail_sums_refuse_several_spectra_at_once():
    W = np.random.default_rng(0).standard_normal((32, 32))
    mpo = MPO.from_matrix(W, (4, 2, 4), (4, 2, 4))
    both = np.stack(mpo.bond_spectra())  # two bonds of 16 values each
    assert both.shape == (2, 16)
    # was: the entropy of one 32-value "spectrum", and a 33-entry tail
    with pytest.raises(ValueError, match=r"1-D array of one bond's singular values.*\(2, 16\)"):
        spectrum_entropy(both)
    with pytest.raises(ValueError, match=r"1-D array of one bond's singular values.*\(2, 16\)"):
        tail_sums(both)
    with pytest.raises(ValueError, match="1-D array of one bond's singular values"):
        spectrum_entropy([np.ones(3), np.ones(2)])  # was: numpy's "inhomogeneous shape"
    s = mpo.singular_values(0)
    assert spectrum_entropy(s) == pytest.approx(float(mpo.entanglement_entropy(0)))
    assert tail_sums(s)[0] == pytest.approx(float((s**2).sum()))


def test_sweeps_refuse_a_site_outside_the_chain():
    W, mpo = small_mpo()
    cores = list(mpo.cores)
    # center -1 made every site a right-isometry and sent site 0's weight around to the
    # last core: a chain canonical about no site -1 or 2 means
    with pytest.raises(ValueError, match=r"center must be a site of the 3-site chain.*got -1"):
        sweeps.canonicalize(cores, -1)
    with pytest.raises(ValueError, match=r"center must be a site.*got 3"):
        sweeps.canonicalize(cores, 3)  # was: IndexError
    with pytest.raises(ValueError, match=r"center must be a site.*got 7"):
        sweeps.is_canonical(cores, 7, 1e-8)  # was: False
    with pytest.raises(ValueError, match=r"upto must be a site.*got -1"):
        sweeps.left_orthogonalize(cores, -1)  # was: nothing done
    with pytest.raises(ValueError, match=r"downto must be a site.*got 3"):
        sweeps.right_orthogonalize(cores, 3)
    with pytest.raises(TypeError, match="center must be an int"):
        sweeps.canonicalize(cores, True)
    for c in range(3):
        canon = sweeps.canonicalize(iter(cores), np.int64(c))
        assert sweeps.is_canonical(canon, c, 1e-10)
        assert np.abs(MPO(canon).to_matrix() - W).max() < 1e-10
