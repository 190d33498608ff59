import jax
import jax.numpy as jnp
import numpy as np
import pytest
from spectra import SPECTRA, matrix_with_spectrum, pytree_operator, random_orthogonal

import hesskit as hk
from hesskit.diagnostics import compare_spectra


def _result(values, vectors):
    values = jnp.asarray(values)
    k = values.shape[0]
    return hk.EigResult(values, vectors, jnp.zeros(k), jnp.ones(k, bool), 0, 0, True)


def _tree(mat, dtype):
    """Columns of ``mat`` (n x k) as a stacked pytree {"u": (k, 3), "w": {"z": (k, n-3, 1)}}."""
    m = jnp.asarray(mat.T, dtype)
    return {"u": m[:, :3], "w": {"z": m[:, 3:, None]}}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_identical_and_sign_flipped_sets(dtype):
    q = random_orthogonal(10, seed=0)[:, :4]
    vals = np.array([4.0, 3.0, 2.0, 1.0])
    a = _result(jnp.asarray(vals, dtype), _tree(q, dtype))
    b = _result(jnp.asarray(vals, dtype), _tree(q * np.array([1, -1, 1, -1]), dtype))
    eps = 1e-3 if dtype == jnp.float32 else 1e-7
    for other in (a, b):
        cmp = compare_spectra(a, other)
        np.testing.assert_allclose(cmp.eigenvalue_diff, 0.0)
        np.testing.assert_allclose(cmp.relative_diff, 0.0)
        np.testing.assert_allclose(cmp.overlaps, np.eye(4), atol=eps**2 * 10)
        np.testing.assert_allclose(cmp.principal_angles, 0.0, atol=eps)
        np.testing.assert_allclose(cmp.matched_angles, 0.0, atol=eps)
        np.testing.assert_array_equal(cmp.matched_index, np.arange(4))
        assert cmp.overlaps.dtype == dtype


def test_rotated_sets_have_known_angles():
    q = random_orthogonal(12, seed=1)
    t1, t2 = 0.3, 1.1
    a_vecs = q[:, [0, 1]]
    b_vecs = np.stack(
        [np.cos(t2) * q[:, 1] + np.sin(t2) * q[:, 3], np.cos(t1) * q[:, 0] + np.sin(t1) * q[:, 2]],
        axis=1,
    )
    a = _result([2.0, 1.0], _tree(a_vecs, jnp.float64))
    b = _result([2.5, 0.5], _tree(b_vecs, jnp.float64))
    cmp = compare_spectra(a, b)
    np.testing.assert_allclose(cmp.principal_angles, [t1, t2], atol=1e-10)
    np.testing.assert_allclose(cmp.overlaps, [[0.0, np.cos(t1)], [np.cos(t2), 0.0]], atol=1e-12)
    np.testing.assert_array_equal(cmp.matched_index, [1, 0])
    np.testing.assert_allclose(cmp.matched_angles, [t1, t2], atol=1e-10)
    np.testing.assert_allclose(cmp.eigenvalue_diff, [-0.5, 0.5])
    np.testing.assert_allclose(cmp.relative_diff, [-0.2, 1.0])


def test_rotation_inside_a_subspace_keeps_zero_principal_angles():
    q = random_orthogonal(8, seed=2)[:, :2]
    t = 0.7
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    a = _result([1.0, 1.0], _tree(q, jnp.float64))
    b = _result([1.0, 1.0], _tree(q @ rot, jnp.float64))
    cmp = compare_spectra(a, b)
    np.testing.assert_allclose(cmp.principal_angles, 0.0, atol=1e-7)
    np.testing.assert_allclose(cmp.matched_angles, t, atol=1e-10)  # pairs turned, span did not


def test_different_sizes_and_eigsh_runs():
    lam = SPECTRA["separated"]
    op = pytree_operator(matrix_with_spectrum(lam, seed=4), jnp.float64)
    a = hk.eigsh(op, jax.random.key(0), k=4)
    b = hk.eigsh(op, jax.random.key(1), k=2)
    cmp = compare_spectra(a, b)
    assert cmp.overlaps.shape == (4, 2)
    assert cmp.principal_angles.shape == (2,)
    assert cmp.eigenvalue_diff.shape == (2,)
    np.testing.assert_allclose(cmp.eigenvalue_diff, 0.0, atol=1e-9)
    np.testing.assert_allclose(cmp.principal_angles, 0.0, atol=1e-6)
    np.testing.assert_array_equal(cmp.matched_index[:2], [0, 1])
    # pairs 3 and 4 of a are orthogonal to all of b
    np.testing.assert_allclose(cmp.matched_angles[2:], np.pi / 2, atol=1e-6)
    assert np.all(np.diff(np.asarray(cmp.principal_angles)) >= 0)


def test_under_jit():
    q = random_orthogonal(6, seed=3)[:, :2]
    a = _result([1.0, 2.0], _tree(q, jnp.float64))
    out = jax.jit(compare_spectra)(a, a)
    np.testing.assert_allclose(out.principal_angles, 0.0, atol=1e-7)


def test_bad_input():
    q = random_orthogonal(6, seed=3)[:, :2]
    a = _result([1.0, 2.0], _tree(q, jnp.float64))
    with pytest.raises(ValueError, match="same pytree structure"):
        compare_spectra(a, _result([1.0, 2.0], jnp.asarray(q.T)))
    with pytest.raises(ValueError, match="same pytree structure"):
        compare_spectra(a, _result([1.0, 2.0], _tree(q, jnp.float32)))
    wrong = {"u": jnp.zeros((2, 4)), "w": {"z": jnp.zeros((2, 3, 1))}}
    with pytest.raises(ValueError, match="same pytree structure"):
        compare_spectra(a, _result([1.0, 2.0], wrong))
    with pytest.raises(ValueError, match="leading axis"):
        compare_spectra(a, _result([1.0, 2.0, 3.0], _tree(q, jnp.float64)))
    with pytest.raises(ValueError, match="shape"):
        compare_spectra(a, _result(jnp.ones((2, 2)), _tree(q, jnp.float64)))


def test_cluster_angles_are_gap_aware():
    # b: eigenvalues 5.0, 4.9, 4.85 (one cluster at rtol 0.1) and 1.0 (isolated). a rotates the
    # first three eigenvectors by 45 degrees among themselves and tilts the isolated one by a
    # known angle out of the span: single-vector angles inside the cluster are large but the
    # cluster's subspace is the same, so its angle is 0; the isolated angle is the tilt.
    n = 12
    q = random_orthogonal(n, seed=3)
    b_vec = q[:, :4]
    c = 2**-0.5
    rot = np.array([[c, -c, 0], [c, c, 0], [0, 0, 1]])
    tilt = 0.3
    a_vec = np.column_stack([b_vec[:, :3] @ rot, np.cos(tilt) * q[:, 3] + np.sin(tilt) * q[:, 4]])
    vals = np.array([5.0, 4.9, 4.85, 1.0])
    a = _result(jnp.asarray(vals * 1.01), _tree(a_vec, jnp.float64))
    b = _result(jnp.asarray(vals), _tree(b_vec, jnp.float64))
    cmp = compare_spectra(a, b)
    np.testing.assert_array_equal(cmp.cluster_index, [1, 1, 1, 0])
    np.testing.assert_allclose(cmp.cluster_angles, [0, 0, 0, tilt], atol=1e-7)
    assert np.degrees(np.asarray(cmp.matched_angles[:2])).min() > 44  # single vectors: far
    # cluster_rtol=0: every pair alone, the cluster angle is the positional single-vector angle.
    alone = compare_spectra(a, b, cluster_rtol=0.0)
    assert len(set(np.asarray(alone.cluster_index).tolist())) == 4
    np.testing.assert_allclose(alone.cluster_angles[:2], [np.pi / 4, np.pi / 4], atol=1e-7)
    with pytest.raises(ValueError, match="cluster_rtol"):
        compare_spectra(a, b, cluster_rtol=-1.0)
