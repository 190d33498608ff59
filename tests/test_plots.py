"""hesskit.plots: each figure renders to a non-empty PNG with the axes it promises."""

from typing import NamedTuple

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from hesskit import plots  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path):
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == PNG_MAGIC


class _Density(NamedTuple):
    grid: np.ndarray
    density: np.ndarray


def test_spectral_density_from_arrays_and_namedtuple(tmp_path):
    t = np.linspace(-2.0, 10.0, 300)
    phi = np.exp(-(t**2)) + 1e-3 * np.exp(-((t - 8) ** 2))
    fig = plots.plot_spectral_density(t, phi, eigenvalues=[-0.5, 8.0], path=tmp_path / "d.png")
    _check_png(tmp_path / "d.png")
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    (line,) = ax.get_lines()
    # values below the floor are clipped, the rest drawn as given
    np.testing.assert_allclose(line.get_ydata(), np.maximum(phi, 1e-8))
    fig2 = plots.plot_spectral_density(_Density(t, phi))
    np.testing.assert_allclose(fig2.axes[0].get_lines()[0].get_xdata(), t)
    with pytest.raises(ValueError, match="same shape"):
        plots.plot_spectral_density(t, phi[:-1])
    with pytest.raises(TypeError, match="Density"):
        plots.plot_spectral_density(t)


def test_eigenvalue_tracks_split_signs_and_loss_axis(tmp_path):
    steps = np.arange(0, 50, 10)
    top = np.array([[4.0, 2.0]] * 5) + np.arange(5)[:, None]
    bottom = np.array([[-0.1], [-0.2], [0.05], [-0.3], [-0.3]])
    loss = np.linspace(2.3, 0.5, 5)
    fig = plots.plot_eigenvalue_tracks(steps, top, bottom, loss=loss, path=tmp_path / "t.png")
    _check_png(tmp_path / "t.png")
    ax, ax2 = fig.axes
    assert ax.get_yscale() == "log" and ax2.get_yscale() == "log"
    reds = [ln for ln in ax.get_lines() if ln.get_color() == "tab:red"]
    blues = [ln for ln in ax.get_lines() if ln.get_color() == "tab:blue"]
    assert len(blues) == 3 and len(reds) == 1  # the SA column has positive and negative parts
    # the negative track holds |lambda| where lambda < 0 and gaps (nan) elsewhere
    y = np.asarray(reds[0].get_ydata(), float)
    np.testing.assert_allclose(y[[0, 1, 3, 4]], [0.1, 0.2, 0.3, 0.3])
    assert np.isnan(y[2])
    np.testing.assert_allclose(ax2.get_lines()[0].get_ydata(), loss)
    assert len(plots.plot_eigenvalue_tracks(steps, top).axes) == 1
    with pytest.raises(ValueError, match="top"):
        plots.plot_eigenvalue_tracks(steps, top[:3])


def test_directional_loss_quadratic_model(tmp_path):
    alphas = np.linspace(-1.0, 1.0, 41)
    lam = np.array([-2.0, 3.0])
    gv = np.array([0.5, -0.2])
    losses = np.stack([0.5 + np.cosh(alphas), 0.5 + np.cosh(2 * alphas)])
    fig = plots.plot_directional_loss(
        alphas, losses, eigenvalues=lam, slopes=gv, loss0=1.5, path=tmp_path / "l.png"
    )
    _check_png(tmp_path / "l.png")
    assert len(fig.axes) == 2
    for ax, loss_i, lam_i, gv_i in zip(fig.axes, losses, lam, gv, strict=True):
        true, quad = ax.get_lines()[:2]
        np.testing.assert_allclose(true.get_ydata(), loss_i)
        expect = 1.5 - alphas * gv_i**2 + 0.5 * alphas**2 * lam_i * gv_i**2
        np.testing.assert_allclose(quad.get_ydata(), expect)
    with pytest.raises(ValueError, match="alphas"):
        plots.plot_directional_loss(alphas[:5], losses, eigenvalues=lam, slopes=gv, loss0=1.0)
    with pytest.raises(ValueError, match="labels"):
        plots.plot_directional_loss(
            alphas, losses, eigenvalues=lam, slopes=gv, loss0=1.0, labels=["x"]
        )


def test_step_sizes_two_panels(tmp_path):
    lam = np.array([-1.0, -0.2, 0.5, 2.0, 4.0])
    alpha = np.array([30.0, 80.0, 2.0, 0.5, 0.25])
    dec = np.array([-0.2, -0.1, -0.01, -0.02, -0.005])
    fig = plots.plot_step_sizes(lam, dec, alpha, path=tmp_path / "s.png")
    _check_png(tmp_path / "s.png")
    ax_dec, ax_inv = fig.axes
    np.testing.assert_allclose(ax_inv.collections[0].get_offsets()[:, 1], 1 / alpha)
    np.testing.assert_allclose(ax_dec.collections[0].get_offsets()[:, 1], dec)
    # the reference line 1/alpha* = lambda
    ref = ax_inv.get_lines()[0]
    np.testing.assert_allclose(ref.get_xdata(), ref.get_ydata())
    coloured = plots.plot_step_sizes(lam, dec, alpha, steps=[0, 0, 10, 10, 20])
    assert len(coloured.axes) == 3  # two panels and the colour bar
    with pytest.raises(ValueError, match="same shape"):
        plots.plot_step_sizes(lam, dec[:2], alpha)


def test_training_loss(tmp_path):
    fig = plots.plot_training_loss(
        np.arange(10),
        np.linspace(2, 1, 10),
        eval_steps=[0, 9],
        eval_loss=[2.1, 0.9],
        path=tmp_path / "loss.png",
    )
    _check_png(tmp_path / "loss.png")
    assert fig.axes[0].get_yscale() == "log"
    assert len(fig.axes[0].get_lines()) == 2


def test_figures_display_as_png_in_notebooks():
    fig = plots.plot_training_loss([0, 1, 2], [2.3, 1.5, 1.0])
    png = fig._repr_png_()
    assert png.startswith(b"\x89PNG")


def test_preconditioner_agreement_per_layer_over_training(tmp_path):
    import jax.numpy as jnp

    from hesskit import preconditioner_agreement

    rng = np.random.default_rng(0)
    h = {
        "a": {"w": jnp.asarray(rng.uniform(0.1, 5, 20)), "b": jnp.ones(4)},
        "c": jnp.arange(1.0, 9),
    }
    recs = []
    for t in range(3):
        nu = {"a": {"w": h["a"]["w"] ** (2 + t), "b": jnp.ones(4)}, "c": h["c"][::-1] ** 2}
        noisy = jax_tree_scale(h, 1.0 + 0.1 * t)
        recs.append(
            preconditioner_agreement(nu, {"H": h}, replicates={"H": (h, noisy)}, groups="module")
        )
    steps = [10, 100, 1000]
    fig = plots.plot_preconditioner_agreement(steps, recs, path=tmp_path / "adam.png")
    _check_png(tmp_path / "adam.png")
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and ax.get_ylim() == (-1.05, 1.05)
    layers = [
        ln for ln in ax.get_lines() if ln.get_linestyle() == "-" and ln.get_label() != "all entries"
    ]
    # two layers, their ceilings (dotted), the overall line and the zero line
    assert [ln.get_label() for ln in layers][:2] == ["['a']", "['c']"]
    np.testing.assert_allclose(layers[1].get_ydata(), [-1.0, -1.0, -1.0])
    # The JSON records of the benchmark and the report draw the same figure.
    fig2 = plots.plot_preconditioner_agreement(
        steps, [r.to_dict() for r in recs], measure="pearson_log"
    )
    assert len(fig2.axes[0].get_lines()) == len(ax.get_lines())
    with pytest.raises(ValueError, match="one agreement record per step"):
        plots.plot_preconditioner_agreement(steps[:2], recs)
    with pytest.raises(ValueError, match="measure"):
        plots.plot_preconditioner_agreement(steps, recs, measure="kendall")
    with pytest.raises(ValueError, match="unknown reference"):
        plots.plot_preconditioner_agreement(steps, recs, references=["GGN"])


def jax_tree_scale(tree, c):
    import jax

    return jax.tree.map(lambda x: x * c, tree)
