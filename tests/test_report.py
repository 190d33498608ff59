"""The curvature report CLI: option validation, the output folder, numbers that recompute."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from hesskit._src import report  # noqa: E402

TINY = [
    *("--steps", "4", "--every", "2", "--k", "2", "--subset", "60", "--batch-size", "8"),
    *("--fraction", "0.1", "--trace-probes", "30", "--density-runs", "2", "--density-iters", "30"),
    *("--adam-probes", "8"),
]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "resnet"], "unknown model 'resnet'"),
        (["--model", "mlp,bogus"], "unknown model 'bogus'"),
        (["--steps", "-1"], "--steps must be >= 0"),
        (["--every", "0"], "--every must be >= 1"),
        (["--k", "0"], "--k must be >= 1"),
        (["--model", "linear", "--k", "200"], "too large for model 'linear' with 650 parameters"),
        (["--subset", "5"], "--subset must be in [20, 1797]"),
        (["--subset", "5000"], "--subset must be in [20, 1797]"),
        (["--subset", "50", "--batch-size", "64"], "--batch-size must be in [1, --subset=50]"),
        (["--lr", "-0.1"], "--lr must be a finite positive number"),
        (["--fraction", "0"], "--fraction must be in (0, 1]"),
        (["--fraction", "1.5"], "--fraction must be in (0, 1]"),
        (["--grad-tol", "nan"], "--grad-tol must be a finite positive number"),
        (["--max-matvecs", "5"], "--max-matvecs must be >= 10"),
        (["--trace-probes", "2"], "--trace-probes must be >= 3"),
        (["--density-runs", "0"], "--density-runs must be >= 1"),
        (["--adam-probes", "3"], "--adam-probes must be 0 or an even number >= 2"),
        (["--optimizer", "sgd"], "invalid choice: 'sgd'"),
        (["--steps", "ten"], "invalid int value: 'ten'"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_options_exit_2_with_message(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        report.parse_args(["report", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_no_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        report.main([])
    assert info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_defaults():
    args = report.parse_args(["report"])
    assert args.model == ["cnn", "mlp"]
    assert args.out == "hesskit-report"
    assert args.every == 60  # steps / 5 checkpoints after the start
    assert args.optimizer == "rmsprop" and args.adam_probes == 40


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    import hesskit.examples

    out = tmp_path_factory.mktemp("report")
    lines = []
    traces = [0]
    make_loss = hesskit.examples.make_loss

    def counting_make_loss(module):
        # Counts traces of the model's loss: a Python side effect runs once per trace.
        loss = make_loss(module)

        def counted(params, batch):
            traces[0] += 1
            return loss(params, batch)

        return counted

    def log(line):
        lines.append(line)
        TRACES_AT_LOG.append((line, traces[0]))

    args = report.parse_args(["report", "--model", "mlp", *TINY, "--out", str(out)])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hesskit.examples, "make_loss", counting_make_loss)
        result = report.run_report(args, log=log)
    return out, result, lines


TRACES_AT_LOG: list = []


def test_report_compiles_its_solves_once(tiny_report):
    # Checkpoint lines start with the step. From the second checkpoint on (the training chunk
    # compiles between the first two), a checkpoint traces nothing: the statistics, the
    # tracker's LA and SA solves and the training chunk are all reused.
    at = {int(line.split()[0]): n for line, n in TRACES_AT_LOG if line.split()[0].isdigit()}
    assert sorted(at) == [0, 2, 4]
    assert at[0] > 0 and at[4] == at[2]


def test_report_writes_folder(tiny_report):
    out, _, lines = tiny_report
    for name in [
        "report.json",
        "report.md",
        "mlp/params.msgpack",
        "mlp/loss.png",
        "mlp/tracks.png",
        "mlp/density.png",
        "mlp/directional_top.png",
        "mlp/directional_bottom.png",
        "mlp/steps.png",
        "mlp/adam.png",
    ]:
        assert (out / name).stat().st_size > 0, name
    assert any("lam_max" in line for line in lines)
    data = json.loads((out / "report.json").read_text())
    (res,) = data["models"]
    assert res["model"] == "mlp" and res["num_params"] == 2410
    assert [c["step"] for c in res["checkpoints"]] == [0, 2, 4]
    assert len(res["train_loss"]) == 4
    md = (out / "report.md").read_text()
    assert "## mlp (2410 parameters)" in md and "mlp/loss.png" in md
    assert "What this run shows" in md and "| SA 2 |" in md
    for c in res["checkpoints"]:
        assert len(c["top"]) == len(c["bottom"]) == 2
        assert c["top"][0] == c["lambda_max"] and c["bottom"][0] == c["lambda_min"]
        assert c["classification"] == "not critical"  # |g| is far above 1e-3 after 4 steps


def _saved_problem(out, res, config):
    import flax.serialization

    from hesskit.examples import load_digits, make_classifier, make_loss

    data = load_digits(config["subset"], seed=config["seed"])
    module, template = make_classifier(res["model"], key=jax.random.key(0), sample=data.x[:1])
    raw = (out / res["model"] / "params.msgpack").read_bytes()
    from flax import nnx

    if isinstance(template, nnx.State):  # the report saves nnx parameters as a pure dict
        nnx.replace_by_pure_dict(template, flax.serialization.msgpack_restore(raw))
        params = template
    else:
        params = flax.serialization.from_bytes(template, raw)
    loss_fn = make_loss(module)
    return params, data, loss_fn


def test_report_numbers_recompute(tiny_report):
    out, _, _ = tiny_report
    data_json = json.loads((out / "report.json").read_text())
    (res,) = data_json["models"]
    params, data, loss_fn = _saved_problem(out, res, data_json["config"])
    last = res["checkpoints"][-1]
    loss, grads = jax.value_and_grad(loss_fn)(params, data)
    np.testing.assert_allclose(last["loss"], loss, rtol=1e-5)
    gnorm = jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree_util.tree_leaves(grads)))
    np.testing.assert_allclose(last["grad_norm"], gnorm, rtol=1e-4)


def _dense(f, params):
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(params)
    h = jax.hessian(lambda x: f(unravel(x)))(flat)
    return np.asarray(h, np.float64), unravel


def test_report_spectra_match_dense(tiny_report):
    out, _, _ = tiny_report
    data_json = json.loads((out / "report.json").read_text())
    (res,) = data_json["models"]
    params, data, loss_fn = _saved_problem(out, res, data_json["config"])
    h, unravel = _dense(lambda p: loss_fn(p, data), params)
    evals, evecs = np.linalg.eigh(h)
    last, fin = res["checkpoints"][-1], res["final"]
    scale = abs(evals).max()
    assert last["converged"]
    np.testing.assert_allclose(last["top"], evals[::-1][:2], atol=1e-4 * scale)
    np.testing.assert_allclose(last["bottom"], evals[:2], atol=1e-4 * scale)
    # Hutch++ with 30 probes: within four of its own standard errors of the exact trace.
    tr = fin["trace"]
    assert abs(tr["value"] - np.trace(h)) <= 4 * tr["stderr"] + 1e-3 * abs(np.trace(h))
    assert fin["damping_for_pd"] == pytest.approx(-evals[0], rel=1e-3)
    assert fin["max_stable_lr"] == pytest.approx(2 / evals[-1], rel=1e-3)
    d = fin["density"]
    assert float(jnp.trapezoid(jnp.asarray(d["density"]), jnp.asarray(d["grid"]))) == pytest.approx(
        1.0, abs=1e-3
    )


def test_report_directional_losses_recompute(tiny_report):
    import hesskit as hk

    out, _, _ = tiny_report
    data_json = json.loads((out / "report.json").read_text())
    (res,) = data_json["models"]
    params, data, loss_fn = _saved_problem(out, res, data_json["config"])
    h, unravel = _dense(lambda p: loss_fn(p, data), params)
    evals, evecs = np.linalg.eigh(h)
    dl = res["final"]["directional"]
    alphas = np.asarray(dl["alphas"])
    assert alphas[0] == 0 and np.all(np.diff(alphas) > 0)
    # The step alpha (g.v) v does not depend on the sign of v: the dense top and bottom
    # eigenvectors must give the same curves.
    for i, j in ((0, -1), (2, 0)):
        v = unravel(jnp.asarray(evecs[:, j], jnp.float32))
        ref = hk.directional_loss(
            lambda p: loss_fn(p, data), params, v, jnp.asarray(alphas, jnp.float32)
        )
        # The report's curve follows its eigsh vector, this one the dense float64 vector cast
        # to float32: their ~1e-5 difference grows with alpha (3e-4 at the far end of the grid
        # on the nnx MLP's point).
        np.testing.assert_allclose(dl["losses"][i], ref.losses, rtol=1e-3)
        assert dl["alpha_star"][i] == pytest.approx(float(ref.alpha_star), rel=0.1)
        assert dl["eigenvalues"][i] == pytest.approx(evals[j], abs=1e-4 * abs(evals).max())
    assert dl["loss0"] == pytest.approx(float(loss_fn(params, data)), rel=1e-5)


def test_report_subset_comparison_recomputes(tiny_report):
    out, _, _ = tiny_report
    data_json = json.loads((out / "report.json").read_text())
    (res,) = data_json["models"]
    params, data, loss_fn = _saved_problem(out, res, data_json["config"])
    sub = res["final"]["subset"]
    assert sub["num_examples"] == 6  # 10% of 60
    small = jax.tree_util.tree_map(lambda a: a[:6], data)
    h, _ = _dense(lambda p: loss_fn(p, small), params)
    evals = np.linalg.eigvalsh(h)
    scale = abs(evals).max()
    np.testing.assert_allclose(sub["top"], evals[::-1][:2], atol=1e-4 * scale)
    np.testing.assert_allclose(sub["bottom"], evals[:2], atol=1e-4 * scale)
    full_top = np.asarray(res["checkpoints"][-1]["top"])
    np.testing.assert_allclose(
        sub["relative_diff_top"], (np.asarray(sub["top"]) - full_top) / abs(full_top), rtol=1e-5
    )
    assert all(0 <= a <= 90 for a in sub["matched_angles_top_deg"])


def test_report_adam_section(tiny_report):
    # RMSProp trains the report's model, so a side Adam run from the same start feeds the
    # section, at the same checkpoints after the start.
    out, result, lines = tiny_report
    data = json.loads((out / "report.json").read_text())
    assert data["config"]["optimizer"] == "rmsprop" and data["config"]["adam_probes"] == 8
    (res,) = data["models"]
    adam = res["adam"]
    assert adam["run"] == "a side Adam run" and adam["probes"] == 8
    assert [c["step"] for c in adam["checkpoints"]] == [2, 4]
    refs = set(report.ADAM_REFS)
    for c in adam["checkpoints"]:
        assert c["names"] == ["['layers'][0]", "['layers'][1]"] and sum(c["sizes"]) == 2410
        assert set(c["spearman"]) == refs and set(c["overall_spearman"]) == refs
        for r in refs:
            assert all(-1 <= x <= 1 for x in c["spearman"][r])
        # Hutchinson references carry their split-half ceiling, the exact ones do not.
        assert all(x is not None for x in c["ceiling"]["|diag H|"])
        assert all(x is None for x in c["ceiling"]["empirical Fisher"])
        assert np.isfinite(c["loss"])
    md = (out / "report.md").read_text()
    assert "### Adam against the Hessian" in md and "mlp/adam.png" in md
    assert "\\|diag H\\|: ρ_s / r_log" in md  # pipes escaped inside the table
    (finding,) = report._adam_findings(adam)
    assert finding in md and "step 4" in finding
    assert any("Adam sqrt(v) vs diagonals" in line for line in lines)


def test_report_uses_one_be_solve(tiny_report):
    # One which="BE" run per checkpoint gives both ends (fewer products than LA and SA runs on
    # the report's models; the numbers are in report._tracker's docstring).
    tracker = report._tracker(2, 100)
    assert tracker.which == "BE" and (tracker.k_top, tracker.k_bottom) == (2, 2)
