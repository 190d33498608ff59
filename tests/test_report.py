"""The curvature report CLI: option validation, the output folder, numbers that recompute."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from hesskit._src import report  # noqa: E402

TINY = ["--steps", "4", "--every", "2", "--k", "2", "--subset", "60", "--batch-size", "8"]


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


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    lines = []
    args = report.parse_args(["report", "--model", "mlp", *TINY, "--out", str(out)])
    result = report.run_report(args, log=lines.append)
    return out, result, lines


def test_report_writes_folder(tiny_report):
    out, _, lines = tiny_report
    for name in [
        "report.json",
        "report.md",
        "mlp/params.msgpack",
        "mlp/loss.png",
        "mlp/tracks.png",
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


def _saved_problem(out, res, config):
    import flax.serialization

    from hesskit.examples import load_digits, make_classifier, make_loss

    data = load_digits(config["subset"], seed=config["seed"])
    module, template = make_classifier(res["model"], key=jax.random.key(0), sample=data.x[:1])
    raw = (out / res["model"] / "params.msgpack").read_bytes()
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
