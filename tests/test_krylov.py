"""The Krylov core: loop strategies, mixed precision, status codes, memory and defaults."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from spectra import SPECTRA, dense_operator, matrix_with_spectrum

import hesskit as hk
from hesskit._src import krylov, memory, thick_restart


def _conv_loss(p, x, y):
    h = jax.lax.conv_general_dilated(
        x, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    out = jnp.tanh(h).reshape(x.shape[0], -1) @ p["w"]
    return jnp.mean((out - y) ** 2)


def _conv_problem(dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "k": 0.5 * jax.random.normal(k[0], (3, 3, 1, 2), dtype),
        "w": 0.3 * jax.random.normal(k[1], (2 * 5 * 5, 2), dtype),
    }
    x = jax.random.normal(k[2], (8, 5, 5, 1), dtype)
    y = jax.random.normal(k[3], (8, 2), dtype)
    return params, x, y


def _mlp_problem(dtype=jnp.float32, n=64):
    k = jax.random.split(jax.random.key(1), 4)
    params = {
        "w1": (0.7 * jax.random.normal(k[0], (6, 12))).astype(dtype),
        "b1": jnp.zeros(12, dtype),
        "w2": (0.7 * jax.random.normal(k[1], (12, 3))).astype(dtype),
    }
    x = jax.random.normal(k[2], (n, 6)).astype(dtype)
    y = jax.random.normal(k[3], (n, 3)).astype(dtype)

    def f(p):
        h = jnp.tanh(x.astype(p["w1"].dtype) @ p["w1"] + p["b1"])
        return 0.5 * jnp.mean((h @ p["w2"] - y.astype(p["w2"].dtype)) ** 2)

    return params, f


def _dense_hessian(f, params):
    flat, unravel = ravel_pytree(jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params))
    return np.asarray(jax.hessian(lambda z: f(unravel(z)))(flat))


# -- Loop strategies -----------------------------------------------------------------------------
def test_host_and_compiled_loops_agree_on_a_convolution():
    params, x, y = _conv_problem()
    op = hk.hessian_operator(lambda p: _conv_loss(p, x, y), params)
    assert krylov.loop_penalized(op) == (jax.default_backend() == "cpu")
    host = hk.eigsh(op, jax.random.key(0), 2, which="BE", loop="host")
    comp = hk.eigsh(op, jax.random.key(0), 2, which="BE", loop="compiled")
    assert int(host.num_matvecs) == int(comp.num_matvecs)
    assert int(host.status) == int(comp.status) == krylov.CONVERGED
    np.testing.assert_allclose(host.eigenvalues, comp.eigenvalues, rtol=1e-5, atol=1e-7)
    x64, y64 = x.astype(jnp.float64), y.astype(jnp.float64)
    ev = np.linalg.eigvalsh(_dense_hessian(lambda p: _conv_loss(p, x64, y64), params))
    np.testing.assert_allclose(host.eigenvalues, [ev[0], ev[-1]], atol=2e-5 * np.abs(ev).max())


def test_lanczos_power_and_slq_host_loops_match_compiled():
    params, x, y = _conv_problem()
    op = hk.hessian_operator(_conv_loss, params, x, y)
    host = hk.lanczos(op, jax.random.key(1), 12, loop="host")
    comp = hk.lanczos(op, jax.random.key(1), 12, loop="compiled")
    np.testing.assert_allclose(host.alphas, comp.alphas, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(host.betas, comp.betas, rtol=1e-5, atol=1e-6)
    p_host = hk.power_iteration(op, jax.random.key(3), num_iters=30, loop="host")
    p_comp = hk.power_iteration(op, jax.random.key(3), num_iters=30, loop="compiled")
    assert int(p_host.num_matvecs) == int(p_comp.num_matvecs)
    np.testing.assert_allclose(p_host.eigenvalues, p_comp.eigenvalues, rtol=1e-5)
    d_host = hk.spectral_density(op, jax.random.key(2), num_runs=2, num_iters=8)  # auto: host
    d_comp = hk.spectral_density(op, jax.random.key(2), num_runs=2, num_iters=8, loop="compiled")
    np.testing.assert_allclose(d_host.nodes, d_comp.nodes, rtol=1e-4, atol=1e-5)


def test_eigenvalues_only_host_loop_matches_compiled_and_eigh():
    # The eigenvalues-only mode once ignored ``loop`` and ran its products inside a compiled
    # while loop even for convolutions on CPU (16-20x slower per product there).
    params, x, y = _conv_problem()
    traces = [0]

    def counted(p, x, y):
        traces[0] += 1
        return _conv_loss(p, x, y)

    op = hk.hessian_operator(counted, params, x, y)
    x64, y64 = x.astype(jnp.float64), y.astype(jnp.float64)
    ev = np.linalg.eigvalsh(_dense_hessian(lambda p: _conv_loss(p, x64, y64), params))
    host = hk.eigsh(op, jax.random.key(4), 2, which="BE", return_eigenvectors=False)  # auto
    assert int(host.status) == krylov.CONVERGED
    np.testing.assert_allclose(host.eigenvalues, [ev[0], ev[-1]], atol=2e-5 * np.abs(ev).max())
    # A new batch of the same shapes reuses every compiled piece of the host loop.
    first = traces[0]
    again = hk.hessian_operator(counted, params, -x, y)
    hk.eigsh(again, jax.random.key(5), 2, which="BE", return_eigenvectors=False)
    assert first > 0 and traces[0] == first, (first, traces[0])
    # The same arithmetic as the compiled loop, on a dense paper-shaped spectrum.
    a = matrix_with_spectrum(SPECTRA["paper"], seed=3)
    runs = [
        hk.eigsh(
            dense_operator(a),
            jax.random.key(4),
            3,
            which="BE",
            return_eigenvectors=False,
            loop=lp,
        )
        for lp in ("host", "compiled")
    ]
    assert int(runs[0].num_matvecs) == int(runs[1].num_matvecs)
    assert int(runs[0].status) == int(runs[1].status) == krylov.CONVERGED
    np.testing.assert_allclose(runs[0].eigenvalues, runs[1].eigenvalues, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(runs[0].residuals, runs[1].residuals, rtol=1e-6, atol=1e-12)
    # A tiny budget, and a run stopped by an invariant subspace (the Krylov
    # space of a rank-2 operator is full after two or three products, well inside the first
    # check's cycle of 16), stop where the compiled loop stops.
    u = jnp.linspace(-1.0, 1.0, 30)
    w = jnp.cos(jnp.arange(30.0))
    low = hk.LinearOperator(lambda v: 3.0 * u * (u @ v) - w * (w @ v), jnp.zeros(30))
    counts, shorts = [], []
    for loop in ("host", "compiled"):
        short = hk.eigsh(
            low, jax.random.key(0), 1, return_eigenvectors=False, max_matvecs=2, loop=loop
        )
        shorts.append((int(short.num_matvecs), int(short.status)))
        res = hk.eigsh(
            low, jax.random.key(0), 1, return_eigenvectors=False, loop=loop, verify=False
        )
        checked = hk.eigsh(low, jax.random.key(0), 1, return_eigenvectors=False, loop=loop)
        # The check is one more run of the same few products, stopped the same way.
        assert int(checked.num_matvecs) <= 2 * int(res.num_matvecs)
        np.testing.assert_allclose(checked.eigenvalues, res.eigenvalues, rtol=1e-9)
        counts.append(int(res.num_matvecs))
        np.testing.assert_allclose(
            res.eigenvalues,
            np.linalg.eigvalsh(3.0 * np.outer(u, u) - np.outer(w, w))[-1:],
            rtol=1e-5,
        )
    assert counts[0] == counts[1] <= 3, counts
    assert shorts[0] == shorts[1] and shorts[0][0] == 2, shorts


def test_host_loop_on_dense_spectra_matches_eigh():
    a = matrix_with_spectrum(SPECTRA["paper"], seed=2)
    ev = np.linalg.eigvalsh(a)
    res = hk.eigsh(dense_operator(a), jax.random.key(0), 3, which="SA", loop="host")
    np.testing.assert_allclose(res.eigenvalues, ev[:3], atol=1e-9 * np.abs(ev).max())
    assert bool(res.converged.all()) and int(res.status) == krylov.CONVERGED


def test_auto_loop_is_compiled_under_jit_and_host_is_refused_there():
    params, x, y = _conv_problem()
    op = hk.hessian_operator(lambda p: _conv_loss(p, x, y), params)
    jitted = jax.jit(lambda op, key: hk.eigsh(op, key, 1).eigenvalues)
    eager = hk.eigsh(op, jax.random.key(3), 1).eigenvalues
    np.testing.assert_allclose(jitted(op, jax.random.key(3)), eager, rtol=1e-5)
    with pytest.raises(ValueError, match="host"):
        jax.jit(lambda op, key: hk.eigsh(op, key, 1, loop="host").eigenvalues)(
            op, jax.random.key(0)
        )
    with pytest.raises(ValueError, match="loop"):
        hk.eigsh(op, jax.random.key(0), 1, loop="python")


_TRACES = []


def _counted_conv_loss(p, x, y):
    _TRACES.append(None)
    return _conv_loss(p, x, y)


@pytest.mark.parametrize("loop", ["host", "compiled"])
def test_new_parameters_and_data_do_not_retrace_the_loss(loop):
    params, x, y = _conv_problem()
    _TRACES.clear()
    op = hk.hessian_operator(_counted_conv_loss, params, x, y)
    hk.eigsh(op, jax.random.key(0), 1, loop=loop, max_matvecs=60)
    first = len(_TRACES)
    new = jax.tree_util.tree_map(lambda a: 0.9 * a, params)
    hk.eigsh(
        hk.hessian_operator(_counted_conv_loss, new, x + 1.0, y),
        jax.random.key(1),
        1,
        loop=loop,
        max_matvecs=60,
    )
    assert len(_TRACES) == first


# -- Mixed precision -----------------------------------------------------------------------------
def test_bfloat16_parameters_converge_at_the_default_tolerance():
    params, f = _mlp_problem()
    ev = np.linalg.eigvalsh(_dense_hessian(f, params))
    pb = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    seen = []

    def fb(p):
        seen.append({jnp.result_type(a) for a in jax.tree_util.tree_leaves(p)})
        return f(p)

    res = hk.eigsh(hk.hessian_operator(fb, pb), jax.random.key(0), 2, which="BE")
    assert int(res.status) == krylov.CONVERGED and bool(res.converged.all())
    # The products ran in bfloat16; the Krylov work and the vectors are float32.
    assert all(s == {jnp.dtype(jnp.bfloat16)} for s in seen)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(res.eigenvectors))
    np.testing.assert_allclose(res.eigenvalues, [ev[0], ev[-1]], atol=3e-2 * np.abs(ev).max())
    # The same through trace and lanczos (eigh and qr have no bfloat16 kernels).
    lz = hk.lanczos(hk.hessian_operator(f, pb), jax.random.key(0), 10)
    assert lz.alphas.dtype == jnp.float32 and bool(lz.ok)


def test_tolerance_below_the_precision_floor_is_reported():
    params, f = _mlp_problem()
    mixed = dict(params, w1=params["w1"].astype(jnp.bfloat16))
    op = hk.hessian_operator(f, mixed)
    assert thick_restart.default_tol(op.like) == pytest.approx(
        4 * float(jnp.finfo(jnp.bfloat16).eps)
    )
    res = hk.eigsh(op, jax.random.key(0), 2, tol=1e-7, max_matvecs=3000)
    assert int(res.status) == krylov.PRECISION_FLOOR
    assert not bool(res.converged.all())
    assert int(res.num_matvecs) < 3000  # it stopped because more products cannot help
    ok = hk.eigsh(op, jax.random.key(0), 2)
    assert int(ok.status) == krylov.CONVERGED


def test_float32_tiny_eigenvalues_next_to_a_large_top_end():
    # Late in training: the wanted negative eigenvalues are 1e-6 of the top one. A tolerance
    # of 1e-9 is out of float32's reach; the run says so instead of spending its budget.
    lam = np.concatenate([[1e3, 500.0], np.linspace(-1e-3, 1e-3, 40), [-1e-3 * 1.5, -1e-3 * 2]])
    a = matrix_with_spectrum(lam, seed=6)
    op = dense_operator(a, jnp.float32)
    res = hk.eigsh(op, jax.random.key(0), 2, which="SA", tol=1e-9)
    assert int(res.status) == krylov.PRECISION_FLOOR
    assert int(res.num_matvecs) < 2000
    good = hk.eigsh(op, jax.random.key(0), 2, which="SA")
    assert int(good.status) == krylov.CONVERGED
    np.testing.assert_allclose(good.eigenvalues, np.sort(lam)[:2], atol=2e-5 * 1e3)


def test_narrow_basis_storage():
    a = matrix_with_spectrum(SPECTRA["separated"], seed=1)
    op = dense_operator(a, jnp.float32)
    ev = np.linalg.eigvalsh(a)
    res = hk.eigsh(op, jax.random.key(0), 3, basis_dtype=jnp.bfloat16, tol=1e-2)
    np.testing.assert_allclose(res.eigenvalues, ev[::-1][:3], rtol=1e-2)
    with pytest.raises(TypeError, match="basis_dtype"):
        hk.eigsh(op, jax.random.key(0), 3, basis_dtype=jnp.int32)


# -- Status codes and defaults ------------------------------------------------------------------
def test_status_codes_budget_and_nonfinite():
    a = matrix_with_spectrum(SPECTRA["ill_conditioned"], seed=3)
    res = hk.eigsh(
        dense_operator(a), jax.random.key(0), 3, which="SA", krylov_dim=8, max_matvecs=16
    )
    assert int(res.status) == krylov.MAX_MATVECS
    bad = hk.eigsh(hk.LinearOperator(lambda v: v * jnp.nan, jnp.zeros(30)), jax.random.key(0), 2)
    assert int(bad.status) == krylov.NONFINITE and not bool(bad.ok)
    assert hk.EigResult(1, 2, 3, 4, 5, 6, 7).status == 0  # results built by hand


def test_small_budget_shrinks_the_default_basis():
    a = matrix_with_spectrum(SPECTRA["paper"], seed=1)
    res = hk.eigsh(dense_operator(a), jax.random.key(0), 3, which="SA", max_matvecs=25)
    assert int(res.num_matvecs) <= 25
    with pytest.raises(ValueError, match="max_matvecs"):
        hk.eigsh(dense_operator(a), jax.random.key(0), 3, krylov_dim=30, max_matvecs=25)


def test_default_basis_shrinks_to_the_free_memory(monkeypatch):
    # SA's default basis is large (160 rows); where it would take more than half the free
    # memory it shrinks instead of raising, and an explicit one that cannot fit still raises.
    n = 2000
    per_vector = 4 * n
    monkeypatch.setattr(memory, "available_bytes", lambda: (100 * per_vector, "test"))
    m = thick_restart._default_krylov_dim(3, "SA", n, None, jnp.zeros(n, jnp.float32))
    assert 7 <= m < 160
    assert memory.eigsh_vectors(m, 3) * per_vector <= 50 * per_vector
    a = np.diag(np.linspace(-1.0, 1.0, n)).astype(np.float32)
    res = hk.eigsh(dense_operator(a, jnp.float32), jax.random.key(0), 3, which="SA")
    assert bool(np.all(res.converged))
    with pytest.raises(hk.InsufficientMemoryError):
        hk.eigsh(dense_operator(a, jnp.float32), jax.random.key(0), 3, krylov_dim=160)


def test_checks_inside_a_cycle_stop_before_the_basis_is_full():
    # Converged pairs are found at the check after they converge, not at the end of a cycle:
    # a basis of 59 rows on the paper's well-separated top end stops long before filling it.
    a = matrix_with_spectrum(SPECTRA["paper"], seed=3)
    ev = np.linalg.eigvalsh(a)
    res = hk.eigsh(dense_operator(a), jax.random.key(0), 2, which="LA", krylov_dim=59)
    np.testing.assert_allclose(res.eigenvalues, ev[::-1][:2], rtol=1e-9)
    assert bool(np.all(res.converged)) and int(res.num_restarts) == 0
    assert int(res.num_matvecs) < 59


def test_a_basis_spanning_the_whole_space_ends_the_run():
    d = jnp.asarray([4.0, -2.0, 1.0, 6.0])
    op = hk.LinearOperator(jax.tree_util.Partial(_diag_matvec, d=d), jnp.zeros(4))
    for which, k, want in (("SA", 2, [-2.0, 1.0]), ("LA", 3, [6.0, 4.0, 1.0])):
        res = hk.eigsh(op, jax.random.key(0), k, which=which)
        np.testing.assert_allclose(res.eigenvalues, want, rtol=1e-5)
        assert bool(np.all(res.converged)) and int(res.num_matvecs) <= 6


@pytest.mark.parametrize("rows_per_block", [1, 3, 7, 16])
def test_blocked_gram_schmidt_matches_one_block(rows_per_block):
    # Only the blocks holding filled rows are read, the last block shifted back to fit; the
    # result equals classical Gram-Schmidt against the filled rows.
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((40, 16)))
    basis = {"a": jnp.asarray(q.T[:, :10]), "b": jnp.asarray(q.T[:, 10:].reshape(16, 2, 15))}
    w = {"a": jnp.asarray(rng.standard_normal(10)), "b": jnp.asarray(rng.standard_normal((2, 15)))}
    for filled in (1, 5, 11, 16):
        got, c = krylov.orthogonalize_filled(basis, w, filled, rows_per_block=rows_per_block)
        flat_q = q.T[:filled]
        flat_w = np.concatenate([np.asarray(w["a"]), np.asarray(w["b"]).reshape(-1)])
        np.testing.assert_allclose(c[:filled], flat_q @ flat_w, atol=1e-12)
        np.testing.assert_allclose(c[filled:], 0.0)
        flat_got = np.concatenate([np.asarray(got["a"]), np.asarray(got["b"]).reshape(-1)])
        np.testing.assert_allclose(flat_got, flat_w - flat_q.T @ (flat_q @ flat_w), atol=1e-12)


@pytest.mark.parametrize("shape", [(64,), (61,), (30,), (3, 29), (17, 5), (5,)])
def test_rotate_rows_matches_the_dense_product(shape):
    # Column blocks of the rotation, a shifted last block when the axis is not a multiple of
    # num_blocks, and no blocks when the axis is too short: all give coeffs @ rows.
    m, r = 7, 4
    rng = np.random.default_rng(0)
    stack = {
        "a": jnp.asarray(rng.normal(size=(m, *shape))),
        "b": jnp.asarray(rng.normal(size=(m, 3))),
    }
    coeffs = jnp.asarray(rng.normal(size=(r, m)))
    got = krylov.rotate_rows(stack, coeffs, num_blocks=8)
    for name, leaf in stack.items():
        want = np.asarray(leaf).copy()
        want[:r] = np.tensordot(np.asarray(coeffs), np.asarray(leaf), axes=1)
        tol = 1e-12 if got[name].dtype == jnp.float64 else 1e-5
        np.testing.assert_allclose(got[name], want, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [(640,), (611,), (3, 290), (5,)])
def test_rotate_rows_in_blocks_sized_by_bytes(monkeypatch, shape):
    # The default block count follows the leaf's bytes: with a 1 KiB block the 640-column leaf
    # runs in 35 blocks (the last shifted back), the 5-column one in one piece.
    monkeypatch.setattr(krylov, "_ROTATE_BLOCK_BYTES", 1024)
    m, r = 7, 4
    rng = np.random.default_rng(1)
    leaf = jnp.asarray(rng.normal(size=(m, *shape)), jnp.float32)
    coeffs = jnp.asarray(rng.normal(size=(r, m)), jnp.float32)
    axis_size = max(shape)
    if jax.default_backend() == "cpu" and axis_size >= 16:
        assert krylov._rotate_blocks(leaf, axis_size) > 8
    got = krylov.rotate_rows({"a": leaf}, coeffs)["a"]
    want = np.asarray(leaf).copy()
    want[:r] = np.tensordot(np.asarray(coeffs), np.asarray(leaf), axes=1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# -- Memory --------------------------------------------------------------------------------------
def _temp_vectors(fn, *args, n):
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes / (4 * n)


def _diag_operator(n):
    d = jnp.linspace(-1.0, 10.0, n, dtype=jnp.float32)
    return hk.LinearOperator(jax.tree_util.Partial(_diag_matvec, d=d), jnp.zeros(n, jnp.float32))


def _diag_matvec(v, d):
    return d * v


@pytest.mark.parametrize(("m", "n"), [(20, 50_000), (40, 50_000), (20, 49_999)])
def test_eigsh_holds_two_stacks(m, n):
    # 49,999 is not a multiple of the restart rotation's 8 column blocks: its tail block once
    # made XLA copy the whole stack (a third stack, 85 vectors against the formula's 58).
    op = _diag_operator(n)
    cfg = thick_restart._Config(3, "SA", m, krylov.num_kept(3, m), 2000, True, None, 1e-7, n)
    tol = jnp.float32(1e-5)
    held = _temp_vectors(
        lambda op, key: thick_restart._eigsh_compiled(op, key, None, tol, cfg),
        op,
        jax.random.key(0),
        n=n,
    )
    # Basis and A Q, a column block of each restart rotation, the k Ritz vectors, a few more:
    # the documented formula counts the outputs too (k vectors).
    block = krylov.block_copy_rows(op.like, m)
    assert held + 3 <= memory.eigsh_vectors(m, 3, block_rows=block)
    assert held >= 2 * m  # the two stacks are really there (the measurement is meaningful)


def test_lanczos_holds_its_basis_and_a_few_vectors():
    n = 50_000
    op = _diag_operator(n)
    for m in (10, 60):
        compiled = (
            jax.jit(lambda op, key, m=m: hk.lanczos(op, key, m))
            .lower(op, jax.random.key(0))
            .compile()
        )
        ma = compiled.memory_analysis()
        block = krylov.block_copy_rows(op.like, m)
        assert ma.temp_size_in_bytes / (4 * n) <= memory.lanczos_vectors(m, block_rows=block) - m
        assert ma.output_size_in_bytes / (4 * n) == pytest.approx(m, abs=0.1)


def test_cond_any_stays_a_branch_under_vmap():
    # vmap turns a cond with a batched predicate into both branches for every member; the
    # solvers' restarts, verifications and second Gram-Schmidt passes then ran at every step.
    calls = []

    def true_fn(x):
        jax.debug.callback(lambda: calls.append(1))
        return x + 1.0

    f = jax.jit(jax.vmap(lambda p, x: krylov.cond_any(p, true_fn, lambda x: x, x)))
    out = f(jnp.array([True, False, True]), jnp.arange(3.0))
    np.testing.assert_array_equal(out, [1.0, 1.0, 3.0])
    assert calls
    calls.clear()
    out = f(jnp.array([False, False, False]), jnp.arange(3.0))
    np.testing.assert_array_equal(out, [0.0, 1.0, 2.0])
    assert not calls, "the branch ran though no member needed it"
    # Outside vmap it is the plain cond.
    assert float(jax.jit(lambda p: krylov.cond_any(p, true_fn, lambda x: x, 2.0))(True)) == 3.0
    # batch_max: one size for the batch, the member itself outside vmap.
    assert jax.vmap(lambda x: krylov.batch_max(x) + 0 * x)(jnp.array([3, 7, 5])).tolist() == [7] * 3
    assert int(krylov.batch_max(jnp.asarray(4))) == 4


def test_projected_matrix_is_the_symmetric_part_of_an_unsymmetric_product():
    # Float32 network products are not exactly symmetric. Within a Lanczos chain the entries
    # below the band of Q^T A Q are zero by construction and those above carry the asymmetry;
    # mirroring the upper ones doubled that error in the Ritz residuals, which grew with the
    # basis until a converged pair left tol again (the 3.3M LeNet's BE(6) stopped at 5/6).
    rng = np.random.default_rng(3)
    n, steps = 60, 25
    sym = matrix_with_spectrum(np.linspace(-1.0, 4.0, n), seed=3)
    a = sym + 1e-3 * rng.standard_normal((n, n))
    op = dense_operator(a)
    q0 = jnp.asarray(rng.standard_normal(n))
    st = krylov.init_state(q0 / jnp.linalg.norm(q0), jax.random.key(0), 40, with_images=False)
    for j in range(steps):
        st = krylov.lanczos_step(st, op(st.q), j)
    q = np.asarray(st.basis)[:steps]
    galerkin = q @ a @ q.T
    proj = np.asarray(st.proj)[:steps, :steps]
    asym = 0.5 * (galerkin - galerkin.T)
    assert np.abs(asym).max() > 1e-4  # the test has an asymmetry to see
    np.testing.assert_allclose(proj, 0.5 * (galerkin + galerkin.T), atol=0.01 * np.abs(asym).max())
