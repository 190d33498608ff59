import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from spectra import SPECTRA, matrix_with_spectrum

import hesskit as hk
from hesskit.diagnostics import CLASSES, classify, critical_point_report

KEY = jax.random.key(0)


def _two_d(dtype):
    return {
        "minimum": (lambda p: p[0] ** 2 + p[1] ** 2, jnp.zeros(2, dtype)),
        "maximum": (lambda p: -(p[0] ** 2) - 3.0 * p[1] ** 2, jnp.zeros(2, dtype)),
        "saddle": (lambda p: p[0] ** 2 - p[1] ** 2, jnp.zeros(2, dtype)),
        "degenerate": (lambda p: p[0] ** 4 + p[1] ** 2, jnp.zeros(2, dtype)),
        "not critical": (lambda p: p[0] ** 2 + p[1] ** 2, jnp.ones(2, dtype)),
    }


EXPECTED_2D = {
    "minimum": ("local minimum", 2.0, 2.0),
    "maximum": ("local maximum", -6.0, -2.0),
    "saddle": ("strict saddle", -2.0, 2.0),
    "degenerate": ("degenerate", 0.0, 2.0),
    "not critical": ("not critical", 2.0, 2.0),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", list(EXPECTED_2D))
def test_two_variable_classification(name, dtype):
    f, p = _two_d(dtype)[name]
    label, lo, hi = EXPECTED_2D[name]
    rep = critical_point_report(f, p, KEY)
    assert rep.classification == label
    assert rep.classification in CLASSES
    np.testing.assert_allclose(float(rep.lambda_min), lo, atol=1e-5)
    np.testing.assert_allclose(float(rep.lambda_max), hi, atol=1e-5)
    assert rep.lambda_min.dtype == dtype
    assert bool(rep.converged_min) and bool(rep.converged_max)
    assert rep.grad_tol == 1e-3 and rep.curvature_tol == 1e-6
    # derived quantities from the exact eigenvalues
    expected_lr = 2.0 / hi if hi > 0 else np.inf
    assert float(rep.max_stable_lr) == pytest.approx(expected_lr, rel=1e-5)
    mags = np.abs([lo, hi])
    cond = np.inf if mags.min() == 0 else mags.max() / mags.min()
    assert float(rep.condition_number) == pytest.approx(cond, rel=1e-5)
    assert float(rep.damping) >= max(0.0, -lo) * 1.01 * (1 - 1e-6)
    slack = 2 * np.sqrt(np.finfo(dtype).eps) * max(abs(lo), abs(hi))
    assert float(rep.damping) <= max(0.0, -lo) * 1.01 + slack
    shifted = np.linalg.eigvalsh(np.diag([lo, hi]) + float(rep.damping) * np.eye(2))
    assert shifted.min() > 0


def test_gradient_norm_matches_autodiff():
    f = lambda p: jnp.sum(jnp.sin(p["w"]) * p["b"]) + 0.5 * jnp.sum(p["w"] ** 2)  # noqa: E731
    p = {"w": jnp.arange(1.0, 2.0), "b": jnp.ones(1)}
    rep = critical_point_report(f, p, KEY, k=1)
    g = jax.grad(f)(p)
    expected = np.sqrt(sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(g)))
    assert float(rep.grad_norm) == pytest.approx(expected, rel=1e-6)
    assert float(rep.loss) == pytest.approx(float(f(p)), rel=1e-6)
    assert rep.classification == "not critical"


def _quadratic(a):
    a = jnp.asarray(a)
    n = a.shape[0]
    like = {"a": jnp.zeros(3, a.dtype), "b": {"c": jnp.zeros((n - 3, 1), a.dtype)}}

    def f(p):
        x = ravel_pytree(p)[0]
        return 0.5 * x @ (a @ x)

    return f, like


@pytest.mark.parametrize(
    "spectrum,label",
    [
        ("separated", "local minimum"),
        ("paper", "strict saddle"),
        ("near_singular", "degenerate"),
    ],
)
def test_quadratic_with_chosen_spectrum(spectrum, label):
    lam = SPECTRA[spectrum]
    a = matrix_with_spectrum(lam, seed=3)
    f, p = _quadratic(a)
    rep = critical_point_report(f, p, KEY, k=2)
    exact = np.sort(lam)
    assert rep.classification == label
    np.testing.assert_allclose(np.asarray(rep.eigenvalues), exact[[0, 1, -2, -1]], atol=1e-8)
    assert rep.eigenvalues.shape == (4,)
    assert jax.tree.leaves(rep.eigenvectors)[0].shape[0] == 4
    assert np.all(np.asarray(rep.residuals) < 1e-8)
    computed = np.abs(exact[[0, 1, -2, -1]])
    expected_cond = computed.max() / computed.min() if computed.min() > 1e-9 else np.inf
    if np.isfinite(expected_cond):
        assert float(rep.condition_number) == pytest.approx(expected_cond, rel=1e-5)
        # only the extremes are computed: a lower bound on the true condition number
        true = np.abs(lam).max() / np.abs(lam).min()
        assert float(rep.condition_number) <= true * (1 + 1e-6)
    else:
        assert float(rep.condition_number) > 1e6  # lambda_min ~ 1e-12: numerically singular
    assert float(rep.max_stable_lr) == pytest.approx(2 / exact[-1], rel=1e-8)
    # the damping makes H + damping I positive definite, with a small margin only
    shifted = np.linalg.eigvalsh(a + float(rep.damping) * np.eye(len(lam)))
    assert shifted.min() > 0
    assert float(rep.damping) <= max(0.0, -exact[0]) * 1.02 + 1e-6


def test_float32_quadratic_matches_eigh():
    lam = SPECTRA["paper"]
    a = matrix_with_spectrum(lam, seed=5).astype(np.float32)
    f, p = _quadratic(a)
    rep = critical_point_report(f, p, KEY)
    exact = np.linalg.eigvalsh(a.astype(np.float64))
    assert rep.lambda_min.dtype == jnp.float32
    assert rep.classification == "strict saddle"
    np.testing.assert_allclose(float(rep.lambda_min), exact[0], atol=2e-4)
    np.testing.assert_allclose(float(rep.lambda_max), exact[-1], rtol=1e-5)


def test_undetermined_when_budget_runs_out():
    # the smallest eigenvalues sit in a tight cluster: 20 products cannot resolve them
    rng = np.random.default_rng(0)
    lam = np.concatenate([[-1.0, -0.9999, -0.9998], rng.uniform(-0.999, 1.0, 197)])
    f, p = _quadratic(matrix_with_spectrum(lam, seed=1))
    rep = critical_point_report(f, p, KEY, k=2, max_matvecs=20, krylov_dim=20)
    assert not (bool(rep.converged_min) and bool(rep.converged_max))
    assert rep.classification == "undetermined"
    assert int(rep.num_matvecs) <= 20


def test_classify_rules():
    assert classify(0.0, 1.0, 2.0, True) == "local minimum"
    assert classify(0.0, -2.0, -1.0, True) == "local maximum"
    assert classify(0.0, -1.0, 1.0, True) == "strict saddle"
    assert classify(0.0, 0.0, 1.0, True) == "degenerate"
    assert classify(0.0, -1.0, 0.0, True) == "degenerate"  # negative direction, second test fails
    assert classify(0.0, 0.0, 0.0, True) == "degenerate"
    assert classify(1e-2, 1.0, 2.0, True) == "not critical"
    assert classify(1e-2, 1.0, 2.0, False) == "not critical"  # gradient decides first
    assert classify(0.0, 1.0, 2.0, np.array([True, False])) == "undetermined"
    assert classify(0.0, np.nan, 2.0, True) == "undetermined"
    assert classify(np.nan, 1.0, 2.0, True) == "not critical"
    # curvature_tol is relative to the spectrum's scale
    assert classify(0.0, 1e-7, 1.0, True, curvature_tol=1e-6) == "degenerate"
    assert classify(0.0, 1e-7, 1.0, True, curvature_tol=1e-8) == "local minimum"
    # an eigenvalue within its residual of zero cannot be told from zero
    assert classify(0.0, 1e-3, 1.0, True, residual_min=2e-3) == "degenerate"
    assert classify(0.0, 1e-3, 1.0, True, residual_min=1e-4) == "local minimum"
    # grad_tol is absolute
    assert classify(5e-4, 1.0, 2.0, True, grad_tol=1e-3) == "local minimum"
    assert classify(5e-4, 1.0, 2.0, True, grad_tol=1e-4) == "not critical"


def test_bad_input():
    f = lambda p: jnp.sum(p**2)  # noqa: E731
    p = jnp.zeros(6)
    with pytest.raises(ValueError, match="k must be"):
        critical_point_report(f, p, KEY, k=4)
    with pytest.raises(ValueError, match="k must be"):
        critical_point_report(f, p, KEY, k=0)
    with pytest.raises(ValueError, match="k must be"):
        critical_point_report(f, p, KEY, k=True)
    with pytest.raises(ValueError, match="grad_tol"):
        critical_point_report(f, p, KEY, grad_tol=-1.0)
    with pytest.raises(ValueError, match="curvature_tol"):
        critical_point_report(f, p, KEY, curvature_tol=np.nan)
    with pytest.raises(ValueError, match="scalar"):
        critical_point_report(lambda q: q**2, p, KEY)
    with pytest.raises(TypeError):
        critical_point_report(f, jnp.zeros(6, jnp.int32), KEY)


def test_exported_from_top_level():
    assert hk.critical_point_report is critical_point_report
    assert hk.classify is classify


def test_data_arguments_match_the_closure_form():
    def f(p, c):
        return jnp.sum(c * p**2) + 0.1 * jnp.sum(p**4)

    c = jnp.asarray([2.0, -1.0, 0.5, 3.0])
    with_args = critical_point_report(f, jnp.zeros(4), KEY, c)
    closed = critical_point_report(lambda p: f(p, c), jnp.zeros(4), KEY)
    assert with_args.classification == closed.classification == "strict saddle"
    np.testing.assert_allclose(with_args.eigenvalues, closed.eigenvalues, rtol=1e-10)
    np.testing.assert_allclose(float(with_args.lambda_min), -2.0, rtol=1e-10)
