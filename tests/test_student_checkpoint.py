"""Tests for saving and loading trained students."""

import functools
import json

import jax
import numpy as np
import pytest

from tsjax.students import LocalRidgeStudent, MLPStudent, RidgeStudent
from tsjax.students.checkpoint import METADATA_FILE, StudentMismatchError, load_student, read_metadata, save_student

_SHA = "ab" * 32
_LAYERS = ("layer1", "layer2")
# A non-default alpha checks that hyperparameters are restored.
_RIDGE = RidgeStudent(patch_size=3, alpha=1e-2)


def _maps(seed, channels=(3, 5)):
    """Two layers of small maps, by default with different channel counts."""
    rng = np.random.default_rng(seed)
    maps = {}
    for layer, channels in zip(_LAYERS, channels):
        ref = rng.normal(size=(1, 8, 9, channels)).astype(np.float32)
        insp = (ref * 0.5 + 0.1 * rng.normal(size=ref.shape)).astype(np.float32)
        maps[layer] = (ref, insp, np.ones((1, 8, 9), bool))
    return maps


@functools.partial(jax.jit, static_argnames="student")
def _jit_fit(student, ref, insp, valid, key):
    return student.fit(ref, insp, valid, key)


def _fit_and_save(directory, student, maps, **kwargs):
    states, shapes = {}, {}
    for index, (layer, (ref, insp, valid)) in enumerate(maps.items()):
        states[layer] = _jit_fit(student, ref, insp, valid, jax.random.key(index))
        shapes[layer] = {"ref": ref.shape, "insp": insp.shape}
    save_student(directory, student, states, teacher_sha256=_SHA, fit_shapes=shapes, **kwargs)
    return states


@pytest.mark.parametrize(
    "student",
    [
        _RIDGE,
        MLPStudent(patch_size=3, hidden_size=8, steps=20, warmup_steps=2, eval_every=10, batch_size=16),
    ],
    ids=["ridge", "mlp"],
)
def test_checkpoint_round_trip(tmp_path, student):
    # Equal channel counts let the MLP's two layers share one compiled fit.
    maps = _maps(0, channels=(3, 5) if isinstance(student, RidgeStudent) else (3, 3))
    states = _fit_and_save(tmp_path / "ckpt", student, maps, training={"pairs": ["a.tif"]})
    loaded_student, loaded_states = load_student(tmp_path / "ckpt", teacher_sha256=_SHA, layers=_LAYERS, patch_size=3)
    assert loaded_student == student
    assert list(loaded_states) == list(_LAYERS)
    for layer in _LAYERS:
        assert type(loaded_states[layer]) is type(states[layer])
        saved = jax.tree_util.tree_leaves(states[layer])
        restored = jax.tree_util.tree_leaves(loaded_states[layer])
        assert len(saved) == len(restored)
        for before, after in zip(saved, restored):
            np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
        ref = maps[layer][0]
        np.testing.assert_array_equal(
            np.asarray(loaded_student.predict(loaded_states[layer], ref)), np.asarray(student.predict(states[layer], ref))
        )
    assert read_metadata(tmp_path / "ckpt")["training"] == {"pairs": ["a.tif"]}


@pytest.fixture(scope="module")
def ridge_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ridge") / "ckpt"
    _fit_and_save(directory, _RIDGE, _maps(1))
    return directory


@pytest.mark.parametrize(
    "run, names",
    [
        (dict(teacher_sha256="cd" * 32), ["teacher weights: checkpoint sha256 abababab"]),
        (dict(layers=("layer1",)), ["layers: checkpoint ['layer1', 'layer2'], this run ['layer1']"]),
        (dict(patch_size=5), ["patch_size: checkpoint 3, this run 5"]),
        (dict(teacher_sha256="cd" * 32, patch_size=1), ["teacher weights", "patch_size: checkpoint 3, this run 1"]),
    ],
)
def test_checkpoint_mismatch_is_named(ridge_checkpoint, run, names):
    settings = dict(teacher_sha256=_SHA, layers=_LAYERS, patch_size=3)
    settings.update(run)
    with pytest.raises(StudentMismatchError) as error:
        load_student(ridge_checkpoint, **settings)
    for name in names:
        assert name in str(error.value)


def test_checkpoint_refuses_to_overwrite(ridge_checkpoint):
    with pytest.raises(ValueError, match="already contains a student checkpoint"):
        _fit_and_save(ridge_checkpoint, _RIDGE, _maps(1))


def test_checkpoint_overwrite_replaces_states(tmp_path):
    directory = tmp_path / "ckpt"
    _fit_and_save(directory, _RIDGE, _maps(2))
    states = _fit_and_save(directory, RidgeStudent(patch_size=3, alpha=1.0), _maps(3), overwrite=True)
    student, loaded = load_student(directory, teacher_sha256=_SHA, layers=_LAYERS, patch_size=3)
    assert student.alpha == 1.0
    np.testing.assert_array_equal(np.asarray(loaded["layer1"].weights), np.asarray(states["layer1"].weights))


def test_checkpoint_rejects_transductive_student(tmp_path):
    with pytest.raises(ValueError, match="cannot be saved and reused"):
        save_student(tmp_path, LocalRidgeStudent(), {}, teacher_sha256=_SHA, fit_shapes={})


def test_checkpoint_missing_or_foreign_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="no student checkpoint"):
        read_metadata(tmp_path)
    (tmp_path / METADATA_FILE).write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="checkpoint format 99"):
        read_metadata(tmp_path)
