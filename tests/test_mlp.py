"""Tests for the MLP student."""

import jax
import numpy as np
import pytest

from tsjax.students import STUDENTS, MLPStudent, make_student

# Small enough to compile and train in a few seconds on a CPU.
_TINY = dict(hidden_size=16, learning_rate=1e-2, steps=80, warmup_steps=5, eval_every=10, batch_size=64, patience=3)


def _learnable_pair(seed):
    """Return ``[2, 12, 12, 4]`` maps where insp is a smooth nonlinear function of ref."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(2, 12, 12, 4)).astype(np.float32)
    mixing = rng.normal(size=(4, 3)).astype(np.float32)
    insp = np.tanh(ref @ mixing) + 0.05 * rng.normal(size=(2, 12, 12, 3)).astype(np.float32)
    valid = np.ones((2, 12, 12), bool)
    valid[:, :2] = False
    return ref, insp, valid


_STUDENT = MLPStudent(progress=True, **_TINY)
_TRACES = []


@jax.jit
def _fit(ref, insp, valid, key):
    _TRACES.append(1)
    return _STUDENT.fit(ref, insp, valid, key)


@pytest.fixture(scope="module")
def fitted():
    """Fit the tiny student three times through one jitted function."""
    ref, insp, valid = _learnable_pair(0)
    first = _fit(ref, insp, valid, jax.random.key(7))
    second = _fit(ref, insp, valid, jax.random.key(7))
    other = _fit(ref, insp, valid, jax.random.key(8))
    return _STUDENT, (ref, insp, valid), first, second, other, list(_TRACES)


def test_mlp_training_loss_falls(fitted):
    _, _, state, _, _, _ = fitted
    train_loss = np.asarray(state.train_loss)
    rounds_run = int(np.isfinite(train_loss).sum())
    assert rounds_run >= 2
    # Standardised targets start near loss 1; a learnable map must go well below.
    assert train_loss[rounds_run - 1] < 0.5 * train_loss[0]


def test_mlp_same_seed_is_identical(fitted):
    _, _, first, second, other, traces = fitted
    assert len(traces) == 1
    for leaf_a, leaf_b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(second)):
        np.testing.assert_array_equal(np.asarray(leaf_a), np.asarray(leaf_b))
    first_kernel = np.asarray(first.params["params"]["output"]["kernel"])
    other_kernel = np.asarray(other.params["params"]["output"]["kernel"])
    assert not np.array_equal(first_kernel, other_kernel)


def test_mlp_keeps_best_round_and_logs_rounds(fitted):
    student, _, state, _, _, _ = fitted
    holdout = np.asarray(state.holdout_loss)
    assert holdout.shape == (student.rounds,)
    rounds_run = int(np.isfinite(holdout).sum())
    # Rounds run are a prefix of the log, and the kept round has the lowest loss.
    assert np.isfinite(holdout[:rounds_run]).all()
    assert np.isnan(holdout[rounds_run:]).all()
    assert int(state.best_round) == int(np.nanargmin(holdout))


def test_mlp_predicts_better_than_the_mean(fitted):
    student, (ref, insp, valid), state, _, _, _ = fitted
    prediction = np.asarray(student.predict(state, ref))
    assert prediction.shape == insp.shape
    residual = ((prediction - insp) ** 2)[valid].mean()
    variance = ((insp - insp[valid].mean(0)) ** 2)[valid].mean()
    assert residual < 0.5 * variance


def test_mlp_progress_bar_reports_rounds(capfd):
    ref, insp, valid = _learnable_pair(1)
    jax.block_until_ready(_fit(ref, insp, valid, jax.random.key(0)))
    jax.effects_barrier()
    error_output = capfd.readouterr().err
    assert "mlp rounds" in error_output
    assert "stopped after" in error_output


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(activation="swish"), "activation='swish' is unknown"),
        (dict(hidden_layers=3), "hidden_layers must be 1 or 2"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(warmup_steps=100, steps=100), "warmup_steps must lie in"),
        (dict(holdout_fraction=1.0), "holdout_fraction must lie in"),
        (dict(clip_norm=-1.0), "clip_norm must be >= 0"),
    ],
)
def test_mlp_invalid_settings_raise(settings, message):
    with pytest.raises(ValueError, match=message):
        MLPStudent(**settings)


def test_mlp_registered_with_string_options():
    assert STUDENTS["mlp"] is MLPStudent
    student = make_student(
        "mlp", patch_size=1, alpha=0.0, options={"hidden_size": "32", "activation": "relu", "progress": "true"}
    )
    assert student == MLPStudent(patch_size=1, alpha=0.0, hidden_size=32, activation="relu", progress=True)
    with pytest.raises(ValueError, match="has no option"):
        make_student("mlp", patch_size=1, alpha=0.0, options={"width": "32"})
    with pytest.raises(ValueError, match="not a valid int"):
        make_student("mlp", patch_size=1, alpha=0.0, options={"hidden_size": "wide"})
