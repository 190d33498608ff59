# %% [markdown]
# # Reproducing "Negative eigenvalues of the Hessian in deep neural networks"
#
# Alain, Le Roux and Manzagol (2019) computed the extreme eigenpairs of the Hessian of small
# convolutional networks during training and reported five findings. This notebook checks each
# one with hesskit on scikit-learn's digits and a small ReLU CNN (two convolutions, 3,658
# parameters), small enough to run on a laptop CPU in a couple of minutes:
#
# 1. the positive end of the spectrum dominates: LA(k) is much larger than |SA(k)|;
# 2. negative curvature is local: along the most negative eigenvector the loss first follows
#    its quadratic model, then turns up where the model keeps falling;
# 3. the best loss decrease along one eigenvector is larger in negative-curvature directions, and
#    the best step is about $1/\lambda$ for positive $\lambda$ but much longer than $1/|\lambda|$
#    for negative $\lambda$;
# 4. the extreme eigenvalues settle early in training;
# 5. the Hessian of a fixed 5% subset of the training set has nearly the same extreme eigenpairs.
#
# The "training set" here is 1,024 digits; every Hessian below is that of the mean loss over
# all of them (or over the 5% subset), evaluated chunk by chunk with `mean_hessian_operator`.

# %%
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hesskit as hk
from hesskit import plots
from hesskit.examples import load_digits, make_classifier, make_loss

start = time.perf_counter()
N, CHUNK, K = 1024, 256, 3
data = load_digits(N, seed=0)
chunks = jax.tree_util.tree_map(lambda a: a.reshape(N // CHUNK, CHUNK, *a.shape[1:]), data)
# The numbers measured below (and in the README) are for the linen initialization of this
# model; notebook 01 shows the same models in flax nnx.
module, params = make_classifier("cnn", key=jax.random.key(0), sample=data.x[:1], api="linen")
loss_fn = make_loss(module)
print("parameters:", hk.tree_dim(params))

# %% [markdown]
# ## Training with RMSProp while tracking LA(3) and SA(3)
#
# `hk.Tracker` runs `eigsh` for both ends at each checkpoint, starting from the previous
# eigenvectors, and matches the new eigenvectors to the old ones by angle.

# %%
opt = optax.rmsprop(1e-3)


@jax.jit
def train(params, state, keys):
    def step(carry, key):
        params, state = carry
        idx = jax.random.choice(key, N, (32,), replace=False)
        batch = jax.tree_util.tree_map(lambda a: a[idx], data)
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss

    (params, state), losses = jax.lax.scan(step, (params, state), keys)
    return params, state, losses


def full_loss(params):
    return jnp.mean(jax.lax.map(lambda c: loss_fn(params, c), chunks))


tracker = hk.Tracker(k=(K, K), which="LA+SA")
checkpoints = [0, 25, 100, 300, 1000, 2500]
state, t = opt.init(params), 0
for i, target in enumerate(checkpoints):
    if target > t:
        keys = jax.random.split(jax.random.fold_in(jax.random.key(1), t), target - t)
        params, state, _ = train(params, state, keys)
        t = target
    op = hk.mean_hessian_operator(loss_fn, params, chunks)
    rec = tracker.update(t, op, jax.random.key(100 + i), loss=full_loss(params))
    print(
        f"step {t:4d}  loss {rec.loss:.4f}  LA {np.round(rec.eigenvalues[K:], 4)}  "
        f"SA {np.round(rec.eigenvalues[:K], 5)}  HVPs {rec.num_matvecs}  "
        f"converged {rec.converged.all()}"
    )
assert all(r.converged.all() for r in tracker.history)
steps, top, bottom, losses = tracker.as_arrays()
plots.plot_eigenvalue_tracks(steps, top, bottom, loss=losses)

# %% [markdown]
# ## Finding 1: the positive end dominates

# %%
ratios = top[:, 0] / np.abs(bottom[:, 0])
for s, r, lo in zip(steps, ratios, bottom[:, 0], strict=True):
    print(f"step {s:4d}: lambda_max / |lambda_min| = {r:8.1f}   (lambda_min = {lo:.2e})")
assert np.all(bottom[1:, 0] < 0), "a negative eigenvalue exists after training starts"
# At initialization the two ends are comparable; the positive end grows as the network trains.
assert np.all(ratios[steps >= 100] > 10), ratios

# %% [markdown]
# ## Findings 2 and 3: the loss along eigenvectors
#
# Along $\theta - \alpha (g^\top v) v$ for a unit eigenvector $v$ with eigenvalue $\lambda$ the
# quadratic model is $L_0 - \alpha (g^\top v)^2 + \tfrac12 \alpha^2 \lambda (g^\top v)^2$: its
# best step is $\alpha = 1/\lambda$ when $\lambda > 0$ and it has none when $\lambda < 0$.
# `eigen_directional_losses` evaluates the true loss on a geometric grid of steps for every
# eigenvector at once.

# %%
last = tracker.history[-1]
order = np.r_[K : 2 * K, 0:K]  # largest first, then most negative first
eig = hk.EigResult(
    jnp.asarray(last.eigenvalues[order]),
    jax.tree_util.tree_map(lambda a: a[order], last.eigenvectors),
    jnp.asarray(last.residuals[order]),
    jnp.asarray(last.converged[order]),
    jnp.asarray(last.num_matvecs),
    jnp.asarray(0),
    jnp.asarray(True),
)
lam = np.asarray(eig.eigenvalues)
alphas = jnp.concatenate(
    [jnp.zeros(1), jnp.geomspace(1e-2 / lam[0], 1e3 / abs(lam[-1]), 300, dtype=jnp.float32)]
)
dl = hk.eigen_directional_losses(loss_fn, params, eig, alphas, chunks=chunks)
alpha_star = np.asarray(dl.alpha_star)
best = np.asarray(dl.best_decrease)
print(f"{'lambda':>10} {'1/|lambda|':>10} {'alpha*':>10} {'alpha*|lambda|':>14} {'best decrease':>14}")
for i in range(2 * K):
    print(
        f"{lam[i]:10.4g} {1 / abs(lam[i]):10.4g} {alpha_star[i]:10.4g} "
        f"{alpha_star[i] * abs(lam[i]):14.3g} {best[i]:14.3e}"
    )

# %%
i_neg = K  # the most negative direction
mask = np.asarray(alphas) <= 3 * alpha_star[i_neg]
plots.plot_directional_loss(
    np.asarray(alphas)[mask],
    np.asarray(dl.losses[i_neg])[mask],
    eigenvalues=lam[i_neg],
    slopes=float(dl.slope[i_neg]),
    loss0=float(dl.loss0[0]),
    title="most negative eigenvector: loss vs quadratic model",
)

# %%
plots.plot_step_sizes(lam, best, alpha_star)

# %%
# Negative curvature is local: the quadratic model keeps falling while the true loss turns up.
a = np.asarray(alphas)
model, true = np.asarray(dl.model[i_neg]), np.asarray(dl.losses[i_neg])
far = a >= 3 * alpha_star[i_neg]
assert np.any(far) and np.all(np.isfinite(true[far]))
assert np.min(true[far]) > true.min(), "the loss rises again past alpha*"
assert np.all(model[far] < true[far]), "the model falls below the loss"
# Positive directions: alpha* within a factor 2 of 1/lambda.
pos_ratio = alpha_star[:K] * lam[:K]
neg_ratio = alpha_star[K:] * np.abs(lam[K:])
print("alpha* lambda (positive):", np.round(pos_ratio, 2))
print("alpha* |lambda| (negative):", np.round(neg_ratio, 1))
assert np.all((pos_ratio > 0.5) & (pos_ratio < 2)), pos_ratio
assert np.all(neg_ratio > 5 * pos_ratio.max()), neg_ratio
# Every negative direction gives a larger best decrease than every positive one.
assert best[K:].max() < best[:K].min(), best

# %% [markdown]
# Both reproduce: along the positive directions the best step matches the quadratic model's
# $1/\lambda$, while along the negative ones the loss keeps falling far past $1/|\lambda|$ before
# turning up, and the gain there is larger even though $|\lambda|$ is about a hundred times
# smaller than $\lambda_{\max}$.

# %% [markdown]
# ## Finding 4: do the extreme eigenvalues settle early?
#
# The relative change of $\lambda_{\max}$ between consecutive checkpoints, and the angle by
# which its eigenvector turned (matched across checkpoints by `Tracker`).

# %%
rel_change = np.abs(np.diff(top[:, 0])) / np.abs(top[1:, 0])
for s, r, rec in zip(steps[1:], rel_change, tracker.history[1:], strict=True):
    ang = np.degrees(rec.angles_to_previous[K])
    print(f"step {s:4d}: lambda_max moved {r:6.1%}; top eigenvector turned {ang:5.1f} deg")

# %% [markdown]
# In this run they do not settle early: $\lambda_{\max}$ grows about a hundredfold in the first
# few hundred steps and still moves by tens of percent between the last checkpoints (while the
# loss keeps falling), and the top eigenvector keeps turning. What is established early is the
# shape of the spectrum: from step 100 on the positive end is more than ten times the negative
# one (finding 1).

# %% [markdown]
# ## Finding 5: the Hessian of a small fixed subset
#
# The paper's 5% subset of MNIST holds thousands of examples; 5% of our 1,024 digits is 51. We
# compare the extreme eigenpairs on fixed subsets of 5% and 25% with those of the full set.


# %%
def as_result(values, vectors, idx):
    zeros = jnp.zeros(len(idx))
    return hk.EigResult(
        jnp.asarray(values[idx]),
        jax.tree_util.tree_map(lambda a: a[idx], vectors),
        zeros,
        zeros > 0,
        jnp.asarray(0),
        jnp.asarray(0),
        jnp.asarray(True),
    )


top_idx, bot_idx = np.arange(K, 2 * K), np.arange(K)
full_top = as_result(last.eigenvalues, last.eigenvectors, top_idx)
full_bot = as_result(last.eigenvalues, last.eigenvectors, bot_idx)
subset_rows = {}
for frac in (0.05, 0.25):
    n_small = round(frac * N)
    small_chunks = jax.tree_util.tree_map(lambda a: a[None, :n_small], data)
    op_small = hk.mean_hessian_operator(loss_fn, params, small_chunks)
    srec = hk.Tracker(k=(K, K), which="LA+SA").update(t, op_small, jax.random.key(7))
    assert srec.converged.all()
    c_top = hk.compare_spectra(as_result(srec.eigenvalues, srec.eigenvectors, top_idx), full_top)
    c_bot = hk.compare_spectra(as_result(srec.eigenvalues, srec.eigenvectors, bot_idx), full_bot)
    subset_rows[frac] = (
        np.abs(np.asarray(c_top.relative_diff)).max(),
        np.degrees(np.asarray(c_top.matched_angles)).max(),
        np.abs(np.asarray(c_bot.relative_diff)).max(),
        np.degrees(np.asarray(c_bot.matched_angles)).max(),
    )
    print(
        f"{frac:4.0%} ({n_small:3d} examples): LA {np.round(srec.eigenvalues[K:], 3)}, "
        f"SA {np.round(srec.eigenvalues[:K], 3)}"
    )
print(f"full ({N} examples): LA {np.round(last.eigenvalues[K:], 3)}, SA {np.round(last.eigenvalues[:K], 3)}")
print(f"{'subset':>7} {'max |rel diff| LA':>18} {'max angle LA':>13} {'max |rel diff| SA':>18} {'max angle SA':>13}")
for frac, (rt, at, rb, ab) in subset_rows.items():
    print(f"{frac:7.0%} {rt:18.1%} {at:12.1f}° {rb:18.1%} {ab:12.1f}°")
# A larger subset is closer to the full Hessian at the top of the spectrum.
assert subset_rows[0.25][0] < subset_rows[0.05][0]

# %% [markdown]
# In our run, with 51 examples (5%) the top eigenvalues differ by up to about half and the most
# negative ones are about five times larger than on the full set. With 256 examples (25%) the
# eigenvalues agree to about 12%, but the eigenvectors are still 40-50 degrees from their
# matches: the top eigenvalues are close together, so individual eigenvectors rotate easily. At
# this data size the finding does not reproduce; the paper's 5% held thousands of examples.
#
# ## Summary
#
# | finding | here |
# |---|---|
# | LA(k) much larger than \|SA(k)\| | reproduces once training starts (ratio > 10 from step 100) |
# | negative curvature is local | reproduces: the loss turns up where the quadratic model keeps falling |
# | best step ~ 1/λ for λ > 0, much longer for λ < 0; larger decrease along negative directions | reproduces |
# | extreme eigenvalues settle early | does not reproduce: λ_max still moves by tens of percent late in training |
# | a fixed 5% subset gives the same eigenpairs | does not reproduce with 51 examples; eigenvalues within ~12% at 25%, eigenvectors still far apart |
#
# The same findings at the paper's model size (the 3.3M-parameter LeNet on all 1,797 digits at
# 28x28) and on this CNN over all 1,797 digits, with a label-noise run that keeps the training
# loss well above zero and the subset agreement as a curve (eigenvalue error, gap-aware angles,
# and the Rayleigh quotients of the subset's eigenvectors on the full Hessian), are measured by
# `benchmarks/paper.py`: see `benchmarks/results/paper-lenet.md`,
# `benchmarks/results/paper-cnn.md`, the LeNet's runs at a converging budget
# (`benchmarks/results/paper-lenet-label-noise-converging.md` and
# `benchmarks/results/paper-lenet-memorising-converging.md`), and the README's reproduction
# table.

# %%
print(f"total {time.perf_counter() - start:.0f} s")
