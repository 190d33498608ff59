# %% [markdown]
# # hesskit quickstart
#
# hesskit works on the Hessian of a loss without ever forming it: every tool takes a
# `LinearOperator`, a function $v \mapsto Hv$ on pytrees shaped like the parameters. This notebook
# builds one for a small flax model on the bundled digits, then asks it for its extreme
# eigenpairs, its trace, its diagonal, its spectral density and what kind of critical point the
# parameters are near; it ends with other operators (Gauss-Newton, one layer's block, a chunked
# mean) and a Hessian-free linear solve.
#
# The model is small on purpose (2,410 parameters), so that every number below can be checked
# against the dense Hessian, and the notebook asserts each of those checks.
#
# The model is a flax nnx module. hesskit differentiates the parameters only, so the model is
# split into its structure, its `nnx.Param` variables and the rest (batch statistics, RNG
# state: none here) with `graphdef, params, rest = nnx.split(model, nnx.Param, ...)`; the loss
# merges them back. `params` is an `nnx.State`, a pytree hesskit takes as it is.

# %%
import io
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from IPython.display import Image
from jax.flatten_util import ravel_pytree

import hesskit as hk
from hesskit import plots
from hesskit.examples import MLP, NnxModel, load_digits

start = time.perf_counter()
data = load_digits(256)
model = MLP(64, (32, 10), rngs=nnx.Rngs(0))  # 64-32-10 tanh
graphdef, params, rest = nnx.split(model, nnx.Param, ...)
module = NnxModel(graphdef, rest)  # module.apply(params, x) merges and calls the model


def loss_fn(params, batch):
    logits = nnx.merge(graphdef, params, rest)(batch.x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch.y).mean()


print("parameters:", hk.tree_dim(params), "as a pytree:", jax.tree_util.tree_map(jnp.shape, params))

# %% [markdown]
# ## Operators
#
# `hessian_operator(f, params)` is the Hessian of `f` at `params`; applying it costs about two
# gradients (forward-over-reverse). The vectors are pytrees like `params`. For a model this small
# we can check one product against the dense Hessian, which `to_dense()` builds one column at a
# time. The operator is a pytree, so jitted functions of it (`apply`, `to_dense`) compile once
# and are reused below for the trained parameters.

# %%
f = lambda p: loss_fn(p, data)  # noqa: E731
op = hk.hessian_operator(f, params)
print(op)
v = hk.tree_random_normal(jax.random.key(1), params)
# Jitted once for every operator below; an eager product would retrace the model each time.
apply = jax.jit(lambda op, v: op(v))
hv = apply(op, v)
to_dense = jax.jit(lambda op: op.to_dense())
dense = np.asarray(to_dense(op), np.float64)  # (2410, 2410): fine here, never for a real network
flat = lambda tree: np.asarray(ravel_pytree(tree)[0], np.float64)  # noqa: E731
hv_error = np.linalg.norm(flat(hv) - dense @ flat(v)) / np.linalg.norm(flat(hv))
print(f"|Hv - dense @ v| / |Hv| = {hv_error:.1e}")
assert hv_error < 1e-5
exact = np.linalg.eigvalsh(dense)
print(
    f"dense spectrum: lambda_max={exact[-1]:.4f}, lambda_min={exact[0]:.4f}, "
    f"{np.sum(exact < 0)} of {len(exact)} eigenvalues negative"
)

# %% [markdown]
# ## Extreme eigenpairs
#
# `eigsh` is thick-restart Lanczos in one compiled loop. `which="LA"` asks for the largest
# eigenvalues (the sharpness), `which="SA"` for the smallest (the most negative curvature). Each
# result carries the true residuals $\lVert Hv - \lambda v\rVert$, a `converged` flag per pair
# and the number of Hessian-vector products spent.

# %%
K = 5
top = hk.eigsh(op, jax.random.key(2), k=K, which="LA")
bottom = hk.eigsh(op, jax.random.key(3), k=K, which="SA")
scale = np.max(np.abs(exact))
for name, res, ref in [("LA", top, exact[::-1][:K]), ("SA", bottom, exact[:K])]:
    lam = np.asarray(res.eigenvalues, np.float64)
    rel = np.abs(lam - ref) / scale
    print(f"{name}({K}): {np.round(lam, 5)}")
    print(f"   dense: {np.round(ref, 5)}   max |error| / |lambda|_max = {rel.max():.1e}")
    print(
        f"   residuals {np.asarray(res.residuals)}, converged {np.asarray(res.converged)}, "
        f"{int(res.num_matvecs)} products, {int(res.num_restarts)} restarts"
    )
    assert bool(res.ok) and bool(np.all(res.converged))
    assert rel.max() < 1e-3, rel
    assert np.all(np.asarray(res.residuals) <= 1e-5 * scale * 1.01)

# %% [markdown]
# The eigenvectors come back as a pytree with a leading axis of size `k`, orthonormal, and each
# one's Rayleigh quotient $v^\top H v$ is its eigenvalue.

# %%
vecs = hk.tree_unstack(top.eigenvectors)
gram = np.array([[float(hk.tree_vdot(a, b)) for b in vecs] for a in vecs])
rayleigh = np.array([float(hk.tree_vdot(u, apply(op, u))) for u in vecs])
print("max |V^T V - I| =", f"{np.max(np.abs(gram - np.eye(K))):.1e}")
print("Rayleigh quotients:", np.round(rayleigh, 5))
assert np.max(np.abs(gram - np.eye(K))) < 1e-4
assert np.allclose(rayleigh, top.eigenvalues, rtol=1e-4, atol=1e-5 * scale)

# %% [markdown]
# `power_iteration` is the one-vector alternative. It converges at the rate
# $|\lambda_2|/|\lambda_1|$: quickly for $\lambda_{\max}$ here, where the top gap is large. With a
# shift $\sigma \ge \lambda_{\max}$ it finds $\lambda_{\min}$ instead, but the ratio is then
# $|\lambda_{n-1} - \sigma| / |\lambda_n - \sigma|$, close to 1 next to a dense bulk: that is
# the case for `eigsh(which="SA")`.

# %%
pw = hk.power_iteration(op, jax.random.key(4), num_iters=500, tol=1e-4)
print(
    f"power iteration: lambda_max={float(pw.eigenvalues[0]):.5f} (dense {exact[-1]:.5f}), "
    f"{int(pw.num_matvecs)} products, converged={bool(pw.converged[0])}"
)
assert bool(pw.converged[0]) and abs(float(pw.eigenvalues[0]) - exact[-1]) < 1e-3 * exact[-1]
pw_low = hk.power_iteration(
    op, jax.random.key(5), num_iters=1000, tol=1e-4, shift=float(pw.eigenvalues[0])
)
print(
    f"shifted power iteration: lambda_min={float(pw_low.eigenvalues[0]):.5f} "
    f"(dense {exact[0]:.5f}) after {int(pw_low.num_matvecs)} products, "
    f"converged={bool(pw_low.converged[0])}; eigsh SA({K}): {int(bottom.num_matvecs)} products"
)
assert int(bottom.num_matvecs) < int(pw_low.num_matvecs)

# %% [markdown]
# ## Trace and diagonal
#
# `trace` estimates $\operatorname{tr} H$ from products with random sign vectors. Hutchinson's
# estimator averages $z^\top H z$; Hutch++ spends two thirds of the budget on computing the trace
# of the top of the spectrum exactly and the rest on Hutchinson over what is left, which helps
# when a few eigenvalues dominate. Both return a standard error. Hutchinson's variance is
# governed by $\lVert H\rVert_F^2 = \sum_i \lambda_i^2$, Hutch++'s by what is left of it after
# the top of the spectrum is removed, so the share of $\lVert H\rVert_F^2$ held by the 50
# eigenvalues of largest magnitude (Hutch++ sketches 50 directions with 150 products) says how
# much it can gain. At initialization a quarter of $\lVert H\rVert_F^2$ lies outside those 50,
# and Hutch++ runs its Hutchinson part with only the last third of the products, so the two come
# out about even.
#
# `diagonal` estimates $\operatorname{diag} H$ as $\frac1n\sum_j z_j \odot H z_j$, shaped like
# the parameters. Entry $i$ has variance $\sum_{l \ne i} H_{il}^2 / n$: this Hessian is far from
# diagonal, so 200 probes give a rough estimate, and its error is what that variance predicts.


# %%
def compare_traces(op, dense, key):
    lam2 = np.sort(np.linalg.eigvalsh(dense) ** 2)
    print(f"share of |H|_F^2 in the top 50 |lambda|: {lam2[-50:].sum() / lam2.sum():.3f}")
    exact_trace, stderrs = np.trace(dense), {}
    for method in ["hutchinson", "hutch++"]:
        est = hk.trace(op, key, num_probes=150, method=method)
        err, stderrs[method] = float(est.value) - exact_trace, float(est.stderr)
        print(
            f"{method:>10}, {int(est.num_matvecs)} products: {float(est.value):.5g} +- "
            f"{float(est.stderr):.2g} (dense {exact_trace:.5g}, error {err / exact_trace:+.1e} "
            f"relative, {err / float(est.stderr):+.1f} stderr)"
        )
        assert abs(err) < 4 * float(est.stderr)
    return stderrs


compare_traces(op, dense, jax.random.key(6))

n_probes = 200
diag = flat(hk.diagonal(op, jax.random.key(7), num_probes=n_probes))
exact_diag = np.diag(dense)
rel = np.linalg.norm(diag - exact_diag) / np.linalg.norm(exact_diag)
predicted = np.sqrt(np.sum(dense**2 - np.diag(exact_diag**2)) / n_probes) / np.linalg.norm(
    exact_diag
)
corr = np.corrcoef(diag, exact_diag)[0, 1]
print(
    f"diagonal, {n_probes} probes: relative error {rel:.3f} (predicted by the variance "
    f"{predicted:.3f}), correlation with the dense diagonal {corr:.3f}"
)
assert abs(rel / predicted - 1) < 0.15 and corr > 0.7

# %% [markdown]
# ## Spectral density
#
# `spectral_density` runs a few Lanczos passes from random vectors and turns each into a
# quadrature rule (stochastic Lanczos quadrature), smoothed by Gaussians of width `sigma`. What it
# estimates is the dense spectrum smoothed by the same Gaussians, so that is what it is compared
# with. Most of this spectrum is a bulk at zero (more than three quarters of the eigenvalues lie
# within $\pm 0.05$), with outliers on both sides. The plot marks the extreme eigenvalues found by
# `eigsh` as ticks at the bottom.

# %%
near_zero = np.mean(np.abs(exact) <= 0.05)
print(f"eigenvalues within +-0.05: {near_zero:.0%}")
assert near_zero > 0.75
sigma = 0.02
dens = hk.spectral_density(op, jax.random.key(8), num_runs=10, num_iters=80, sigma=sigma)
grid, phi = np.asarray(dens.grid, np.float64), np.asarray(dens.density, np.float64)
gauss = np.exp(-0.5 * ((grid[:, None] - exact[None, :]) / sigma) ** 2)
phi_dense = gauss.sum(axis=1) / np.trapezoid(gauss.sum(axis=1), grid)
l1 = np.trapezoid(np.abs(phi - phi_dense), grid)
below = grid < 0
neg_slq, neg_dense = np.trapezoid(phi * below, grid), np.trapezoid(phi_dense * below, grid)
mean_slq = float(jnp.sum(dens.weights * dens.nodes)) / dens.nodes.shape[0]
print(f"{dens.nodes.size} products; integral of the density {np.trapezoid(phi, grid):.4f}")
print(f"L1 distance to the smoothed dense spectrum: {l1:.3f} (of a total mass 2)")
print(f"mass below zero: SLQ {neg_slq:.3f}, smoothed dense {neg_dense:.3f}")
print(f"mean eigenvalue: SLQ {mean_slq:.5f}, dense {exact.mean():.5f}")
assert abs(np.trapezoid(phi, grid) - 1) < 1e-3
assert l1 < 0.05 and abs(neg_slq - neg_dense) < 0.02
fig = plots.plot_spectral_density(
    dens, eigenvalues=np.concatenate([bottom.eigenvalues, top.eigenvalues])
)
ax = fig.axes[0]
ax.plot(grid, np.maximum(phi_dense, 1e-8), color="tab:orange", ls="--", lw=1)
labels = ["SLQ", "dense eigenvalues, same smoothing", "eigsh SA(5), LA(5)"]
ax.legend([*ax.lines, *ax.collections], labels)
# hesskit's figures are plain matplotlib Figures (no pyplot state), so show one as a PNG.
buffer = io.BytesIO()
fig.savefig(buffer, format="png", dpi=90)
Image(buffer.getvalue())

# %% [markdown]
# ## Critical points: before and after training
#
# `critical_point_report` combines the gradient norm with $\lambda_{\min}$ and $\lambda_{\max}$
# (one `eigsh` run for both ends) into a classification, and derives the condition number over
# the computed eigenvalues (a lower bound when the Hessian is indefinite), the largest stable
# gradient-descent step $2/\lambda_{\max}$, and the damping $\delta$ that makes $H + \delta I$
# positive definite. At initialization the gradient is far from zero, so the point is not
# critical whatever the curvature.

# %%


def show(rep):
    print(
        f"  {rep.classification}: loss {float(rep.loss):.4f}, |grad| {float(rep.grad_norm):.1e}, "
        f"lambda_min {float(rep.lambda_min):.5f}, lambda_max {float(rep.lambda_max):.4f}\n"
        f"  condition number {float(rep.condition_number):.4g}, "
        f"2/lambda_max {float(rep.max_stable_lr):.4f}, damping {float(rep.damping):.5f}, "
        f"{int(rep.num_matvecs)} products"
    )


rep0 = hk.critical_point_report(f, params, jax.random.key(9))
print("at initialization:")
show(rep0)
assert rep0.classification == "not critical"
assert abs(float(rep0.lambda_max) - exact[-1]) < 1e-3 * scale
assert abs(float(rep0.lambda_min) - exact[0]) < 1e-3 * scale
assert np.isclose(float(rep0.max_stable_lr), 2 / exact[-1], rtol=1e-3)
assert exact[0] + float(rep0.damping) > 0

# %% [markdown]
# Now 1,000 full-batch Adam steps, compiled as one `lax.scan`. The loss falls several
# thousandfold and the gradient norm below the report's default `grad_tol=1e-3`; the Hessian
# keeps a few small negative eigenvalues, so by the report's stated tolerances the point is a
# strict saddle, with negative curvature hundreds of times weaker than the positive curvature.

# %%
opt = optax.adam(1e-2)


@jax.jit
def train(params, opt_state):
    def step(carry, _):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(f)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return jax.lax.scan(step, (params, opt_state), length=1000)


(trained, _), losses = train(params, opt.init(params))
print(f"loss: {float(losses[0]):.4f} -> {float(losses[-1]):.5f}")
op_trained = hk.hessian_operator(f, trained)
dense_trained = np.asarray(to_dense(op_trained), np.float64)
exact_trained = np.linalg.eigvalsh(dense_trained)
rep1 = hk.critical_point_report(f, trained, jax.random.key(10))
print("after training:")
show(rep1)
print(f"  dense: lambda_min {exact_trained[0]:.5f}, lambda_max {exact_trained[-1]:.4f}")
scale_trained = np.max(np.abs(exact_trained))
assert abs(float(rep1.lambda_max) - exact_trained[-1]) < 1e-3 * scale_trained
assert abs(float(rep1.lambda_min) - exact_trained[0]) < 1e-3 * scale_trained
assert rep1.classification == "strict saddle" and float(rep1.grad_norm) < rep1.grad_tol
assert exact_trained[-1] > 100 * abs(exact_trained[0])
assert exact_trained[0] < 0 < exact_trained[0] + float(rep1.damping)
assert np.isclose(float(rep1.max_stable_lr), 2 / exact_trained[-1], rtol=1e-3)
assert float(losses[-1]) < 1e-3 * float(losses[0])

# %% [markdown]
# Training has also changed the shape of the spectrum: a few outlying eigenvalues now hold most of
# $\lVert H\rVert_F^2$, which is the case Hutch++ is built for. With the same 150 products its
# standard error is several times smaller than Hutchinson's.

# %%
stderrs = compare_traces(op_trained, dense_trained, jax.random.key(16))
assert stderrs["hutch++"] < stderrs["hutchinson"] / 3

# %% [markdown]
# ## Other operators, and how they compose
#
# **Gauss-Newton.** `ggn_operator(model_fn, output_loss_fn, params)` is $J^\top H_L J$, with $J$
# the Jacobian of the logits and $H_L$ the Hessian of the cross-entropy in the logits. It is
# positive semidefinite (cross-entropy is convex in the logits), unlike the Hessian at
# initialization, and the same solvers apply to it.

# %%
ggn = hk.ggn_operator(
    lambda p: module.apply(p, data.x),
    lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, data.y).mean(),
    params,
)
ggn_ends = hk.eigsh(ggn, jax.random.key(11), k=2, which="BE")  # one from each end
ggn_min, ggn_max = (float(x) for x in ggn_ends.eigenvalues)
print(
    f"GGN at initialization: lambda_min={ggn_min:.1e}, lambda_max={ggn_max:.4f}, "
    f"residuals {np.asarray(ggn_ends.residuals)}; Hessian: lambda_min={exact[0]:.4f}"
)
assert bool(np.all(ggn_ends.converged))
assert ggn_min >= -1e-5 * ggn_max

# %% [markdown]
# **One layer.** `restrict(op, mask)` is the block of the operator for the parameters an
# optax-style mask selects; its vectors have `None` in the other leaves. Here it is the output
# layer. The logits are linear in that layer's weights, so its block is the Hessian of a convex
# function and has no negative eigenvalues, and by interlacing its eigenvalues lie between the
# full Hessian's extremes.

# %%
mask = jax.tree_util.tree_map_with_path(
    lambda path, _: "['layers'][1]" in jax.tree_util.keystr(path), params
)
block = hk.restrict(op, mask)
in_block = flat(jax.tree_util.tree_map(lambda m, p: jnp.full(p.shape, m), mask, params)) > 0
block_dense = np.asarray(block.to_dense(), np.float64)
block_error = np.max(np.abs(block_dense - dense[np.ix_(in_block, in_block)]))
block_ends = hk.eigsh(block, jax.random.key(13), k=2, which="BE")
block_exact = np.linalg.eigvalsh(block_dense)
print(f"block of {block.dim} parameters; max |block - dense sub-block| = {block_error:.1e}")
print(
    f"block eigsh: lambda_min={float(block_ends.eigenvalues[0]):.1e}, "
    f"lambda_max={float(block_ends.eigenvalues[1]):.5f}; dense block: {block_exact[0]:.1e}, "
    f"{block_exact[-1]:.5f}; full Hessian: [{exact[0]:.4f}, {exact[-1]:.4f}]"
)
assert block.dim == 32 * 10 + 10 and block_error < 1e-6 * scale
assert bool(np.all(block_ends.converged))
assert abs(float(block_ends.eigenvalues[1]) - block_exact[-1]) < 1e-3 * block_exact[-1]
assert float(block_ends.eigenvalues[0]) >= -1e-5 * block_exact[-1]
assert exact[0] <= block_exact[0] and block_exact[-1] <= exact[-1]

# %% [markdown]
# **Chunks.** `mean_hessian_operator(loss_fn, params, chunks)` is the Hessian of the mean loss
# over equal-sized chunks, evaluated one chunk at a time, so memory stays at one chunk. Over four
# chunks of 64 examples it is the full-batch Hessian.

# %%
chunks = jax.tree_util.tree_map(lambda a: a.reshape(4, 64, *a.shape[1:]), data)
op_mean = hk.mean_hessian_operator(loss_fn, params, chunks)
chunk_error = hk.tree_norm(hk.tree_sub(apply(op_mean, v), hv)) / hk.tree_norm(hv)
print(f"|H_chunked v - H v| / |H v| = {float(chunk_error):.1e}")
assert float(chunk_error) < 1e-5

# %% [markdown]
# **Under `jit`.** Operators are pytrees whose arrays (parameters, data) are leaves, so a jitted
# function can take one as an argument, or build one inside, and the solvers run inside it (here
# `power_iteration` and `trace`). A function taking an operator compiles once per operator type
# and shape: the trained parameters below reuse the program compiled for the initial ones, and so
# does a shifted operator (`op + sigma`), whose shift is a leaf.

# %%
traces = []


@jax.jit
def summary(op, key):
    traces.append(None)  # runs only while tracing: counts compilations
    top = hk.power_iteration(op, key, num_iters=300, tol=1e-4)
    return top.eigenvalues[0], hk.trace(op, key, num_probes=30, method="hutchinson")


for name, o, ref in [
    ("H at initialization", op, dense),
    ("H after training", op_trained, dense_trained),
    ("H + I at initialization", op + 1.0, dense + np.eye(len(dense))),
]:
    lam, tr = summary(o, jax.random.key(15))
    lam_ref, tr_ref = np.linalg.eigvalsh(ref)[-1], np.trace(ref)
    print(
        f"{name:>23}: lambda_max {float(lam):.5f} (dense {lam_ref:.5f}), "
        f"trace {float(tr.value):.4g} +- {float(tr.stderr):.2g} (dense {tr_ref:.4g})"
    )
    assert abs(float(lam) - lam_ref) < 1e-3 * lam_ref
    assert abs(float(tr.value) - tr_ref) < 4 * float(tr.stderr)
print(f"summary compiled {len(traces)} time(s) for three operators")
assert len(traces) == 1

# A jitted function may also build the operator from the parameters it is given.
hvp_at = jax.jit(lambda p, v: hk.hessian_operator(f, p)(v))
hv_inside, hv_outside = flat(hvp_at(trained, v)), flat(apply(op_trained, v))
inside_error = np.linalg.norm(hv_inside - hv_outside) / np.linalg.norm(hv_outside)
dense_error = np.linalg.norm(hv_inside - dense_trained @ flat(v)) / np.linalg.norm(hv_outside)
print(
    f"operator built inside jit: {inside_error:.1e} from the one built outside, "
    f"{dense_error:.1e} from the dense product (relative)"
)
assert inside_error < 1e-5 and dense_error < 1e-4

# %% [markdown]
# ## A Hessian-free solve
#
# `solve(op, b)` runs conjugate gradients (or MINRES) with products only; the damping of the
# operator is the $\delta$ in $(H + \delta I)x = b$. Here it computes a damped Newton step
# $-(H + \delta I)^{-1} g$ at the trained parameters, with $\delta$ a tenth of
# $\lambda_{\max}$ on top of the report's damping, and checks it against a dense solve.
#
# Two ways a solve can fail are reported rather than hidden. In float32, at a point where the
# loss is $3 \cdot 10^{-4}$, two evaluations of the same Hessian-vector product (one vector, or a
# column of the batched dense matrix) differ by about $10^{-5}$ relative (see the check under
# `jit` above), so a residual much below that cannot be reached: CG then stops with `status=4`
# (stagnated). On the undamped Hessian at initialization CG meets negative curvature and stops
# with `status=2`.

# %%
grad = jax.grad(f)(trained)
delta = 0.1 * float(rep1.lambda_max) + float(rep1.damping)
damped = hk.hessian_operator(f, trained, damping=delta)
sol = hk.solve(damped, grad, tol=1e-4)
x_dense = np.linalg.solve(dense_trained + delta * np.eye(len(dense_trained)), flat(grad))
sol_error = np.linalg.norm(flat(sol.x) - x_dense) / np.linalg.norm(x_dense)
print(
    f"CG on H + {delta:.2e} I: status {int(sol.status)}, {int(sol.num_iters)} products, "
    f"residual / |g| = {float(sol.residual_norm) / float(hk.tree_norm(grad)):.1e}, "
    f"|x - x_dense| / |x_dense| = {sol_error:.1e}"
)
assert bool(sol.converged) and int(sol.status) == 0 and sol_error < 1e-3
after = float(f(hk.tree_sub(trained, sol.x)))
print(f"loss {float(f(trained)):.3e} -> {after:.3e} after the damped Newton step")
assert after < float(f(trained))

too_tight = hk.solve(damped, grad, tol=1e-7)
print(
    f"asking for tol=1e-7: status {int(too_tight.status)}, residual / |g| = "
    f"{float(too_tight.residual_norm) / float(hk.tree_norm(grad)):.1e}"
)
assert int(too_tight.status) == 4 and not bool(too_tight.converged)

indefinite = hk.solve(op, jax.grad(f)(params))
print(f"CG on the undamped Hessian at initialization: status {int(indefinite.status)}")
assert int(indefinite.status) == 2 and not bool(indefinite.converged)

# %%
print(f"notebook ran in {time.perf_counter() - start:.0f} s")
