"""MLP student: a small Flax network trained with optax on valid pixels.

The network maps a standardised ``k x k`` reference patch to the
standardised inspected feature vector. Training runs entirely under
``jax.jit``: rounds of ``eval_every`` AdamW steps inside a
``lax.while_loop`` that stops early when the loss on held-out pixels has
not improved for ``patience`` rounds, and returns the parameters of the best
round. Minibatches are drawn from the training pixels with keys folded from
one training key, so a fit is a pure function of its inputs and key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import tqdm
from jax.typing import ArrayLike

from tsjax.patches import extract_patches

__all__ = ["ACTIVATIONS", "FeatureMLP", "MLPState", "MLPStudent"]

ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu, "tanh": jnp.tanh}

# Standard deviations below this fraction of the largest one are raised to
# it, so that a dead (constant) channel is not divided by zero.
_MIN_RELATIVE_SCALE = 1e-3


class FeatureMLP(nn.Module):
    """Fully connected network from patch features to feature vectors.

    Attributes:
      hidden_size: Width of every hidden layer.
      hidden_layers: Number of hidden layers.
      activation: Key of ``ACTIVATIONS``.
      out_features: Output channels ``C``.
    """

    hidden_size: int
    hidden_layers: int
    activation: str
    out_features: int

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Map ``[N, d]`` inputs to ``[N, C]`` outputs."""
        activation = ACTIVATIONS[self.activation]
        hidden = inputs
        for index in range(self.hidden_layers):
            hidden = activation(nn.Dense(self.hidden_size, name=f"hidden_{index}")(hidden))
        return nn.Dense(self.out_features, name="output")(hidden)


class MLPState(NamedTuple):
    """Trained network, its standardisation and its loss log.

    Attributes:
      params: Flax parameters of ``FeatureMLP``.
      input_mean: ``[d]`` mean of the training patches.
      input_scale: ``[d]`` standard deviation of the training patches.
      target_mean: ``[C]`` mean of the training targets.
      target_scale: ``[C]`` standard deviation of the training targets.
      train_loss: ``[R]`` mean training loss of each round of
        ``eval_every`` steps, NaN for rounds not run.
      holdout_loss: ``[R]`` loss on the held-out pixels after each round,
        NaN for rounds not run.
      best_round: Round whose parameters were kept (0-based).
    """

    params: Any
    input_mean: jax.Array
    input_scale: jax.Array
    target_mean: jax.Array
    target_scale: jax.Array
    train_loss: jax.Array
    holdout_loss: jax.Array
    best_round: jax.Array


class _Loop(NamedTuple):
    """Carry of the training loop."""

    round: jax.Array
    params: Any
    opt_state: Any
    best_params: Any
    best_loss: jax.Array
    best_round: jax.Array
    stale_rounds: jax.Array
    train_loss: jax.Array
    holdout_loss: jax.Array


def _moments(values: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Weighted per-column mean and floored standard deviation of ``[N, D]`` values."""
    share = weight / jnp.maximum(weight.sum(), 1.0)
    mean = share @ values
    deviation = jnp.sqrt(share @ (values - mean) ** 2)
    return mean, jnp.maximum(deviation, _MIN_RELATIVE_SCALE * deviation.max() + 1e-12)


def _report_progress(bar_holder: dict, total: int, train_loss: Any, holdout_loss: Any) -> None:
    """Advance the tqdm bar of one fit from a host callback."""
    if "bar" not in bar_holder:
        bar_holder["bar"] = tqdm.tqdm(total=total, desc="mlp rounds", unit="round")
    bar = bar_holder["bar"]
    bar.set_postfix(train=f"{float(train_loss):.4f}", holdout=f"{float(holdout_loss):.4f}", refresh=False)
    bar.update(1)


def _close_progress(bar_holder: dict, rounds_run: Any, best_round: Any) -> None:
    """Close the tqdm bar of one fit, which may stop before its total."""
    bar = bar_holder.pop("bar", None)
    if bar is not None:
        bar.set_description(f"mlp rounds (stopped after {int(rounds_run)}, best {int(best_round)})")
        bar.close()


@dataclasses.dataclass(frozen=True)
class MLPStudent:
    """A Flax MLP from reference patches to inspected features.

    Attributes:
      patch_size: Odd side ``k`` of the reference patch, in feature px.
      alpha: AdamW weight decay (decoupled, per step scaled by the learning
        rate), the MLP's counterpart of the ridge penalty.
      hidden_size: Width of each hidden layer.
      hidden_layers: Number of hidden layers, 1 or 2.
      activation: ``'relu'``, ``'gelu'``, ``'silu'`` or ``'tanh'``.
      learning_rate: Peak learning rate of the schedule.
      steps: Maximum number of optimizer steps.
      warmup_steps: Steps of linear warm-up from 0 to ``learning_rate``,
        followed by cosine decay to ``learning_rate * final_lr_fraction``.
      final_lr_fraction: Learning rate at ``steps`` relative to the peak.
      batch_size: Pixels per step, drawn with replacement from the training
        pixels.
      clip_norm: Maximum global norm of the gradient.
      holdout_fraction: Fraction of the pixel positions held out for early
        stopping; a held-out position is held out in every pair of the batch.
      max_holdout_pixels: Cap on the held-out pixels over the batch, so that
        an evaluation costs no more than this many forward passes.
      eval_every: Steps per round; the held-out loss is evaluated after
        each round.
      patience: Rounds without a lower held-out loss before training stops.
      progress: Show a tqdm bar of the rounds (from a host callback).
    """

    patch_size: int = 3
    alpha: float = 1e-3
    hidden_size: int = 256
    hidden_layers: int = 1
    activation: str = "gelu"
    learning_rate: float = 1e-3
    steps: int = 1000
    warmup_steps: int = 50
    final_lr_fraction: float = 0.01
    batch_size: int = 512
    clip_norm: float = 1.0
    holdout_fraction: float = 0.1
    max_holdout_pixels: int = 16384
    eval_every: int = 50
    patience: int = 4
    progress: bool = False
    name: str = "mlp"

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is unknown; use one of {sorted(ACTIVATIONS)}.")
        if self.hidden_layers not in (1, 2):
            raise ValueError(f"hidden_layers must be 1 or 2; got {self.hidden_layers!r}.")
        for name in ("hidden_size", "steps", "batch_size", "eval_every", "patience", "max_holdout_pixels"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)!r}.")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must lie in [0, steps={self.steps}); got {self.warmup_steps!r}.")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must lie in (0, 1); got {self.holdout_fraction!r}.")
        for name in ("alpha", "learning_rate", "clip_norm", "final_lr_fraction"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)!r}.")

    @property
    def rounds(self) -> int:
        """Maximum number of evaluation rounds, the length of the loss log."""
        return math.ceil(self.steps / self.eval_every)

    def _network(self, out_features: int) -> FeatureMLP:
        return FeatureMLP(self.hidden_size, self.hidden_layers, self.activation, out_features)

    def _optimizer(self) -> optax.GradientTransformation:
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=self.learning_rate,
            warmup_steps=self.warmup_steps,
            decay_steps=self.steps,
            end_value=self.learning_rate * self.final_lr_fraction,
        )
        return optax.chain(
            optax.clip_by_global_norm(self.clip_norm),
            optax.adamw(schedule, weight_decay=self.alpha),
        )

    def fit(self, ref: ArrayLike, insp: ArrayLike, valid: ArrayLike, key: jax.Array) -> MLPState:
        """Train on the valid pixels of ``B`` pairs.

        Args:
          ref: ``[B, h, w, C_in]`` reference features.
          insp: ``[B, h, w, C]`` inspected features.
          valid: ``[B, h, w]`` mask of pixels that may be trained on.
          key: PRNG key; it is split once into the held-out split, the
            initialisation and the minibatch keys.

        Returns:
          The ``MLPState`` of the round with the lowest held-out loss.
        """
        patches = extract_patches(jnp.asarray(ref, jnp.float32), self.patch_size)
        inputs = patches.reshape(-1, patches.shape[-1])
        targets = jnp.asarray(insp, jnp.float32).reshape(-1, jnp.shape(insp)[-1])
        weight = jnp.asarray(valid, jnp.float32).reshape(-1)
        count = inputs.shape[0]

        split_key, init_key, batch_key = jax.random.split(key, 3)
        del key
        # Hold out pixel positions in every pair at once, so that augmented
        # copies of a held-out pixel are never trained on.
        batch = jnp.shape(ref)[0]
        positions = count // batch
        held_positions = min(
            max(1, round(self.holdout_fraction * positions)), max(1, self.max_holdout_pixels // batch), positions - 1
        )
        held = jax.random.permutation(split_key, positions)[:held_positions]
        holdout_index = (jnp.arange(batch)[:, None] * positions + held[None, :]).reshape(-1)
        holdout_weight = weight[holdout_index]
        train_weight = weight.at[holdout_index].set(0.0)

        input_mean, input_scale = _moments(inputs, train_weight)
        target_mean, target_scale = _moments(targets, train_weight)

        def standardise(rows: jax.Array) -> tuple[jax.Array, jax.Array]:
            return (inputs[rows] - input_mean) / input_scale, (targets[rows] - target_mean) / target_scale

        network = self._network(targets.shape[-1])
        optimizer = self._optimizer()
        params = network.init(init_key, jnp.zeros((1, inputs.shape[-1]), jnp.float32))
        holdout_inputs, holdout_targets = standardise(holdout_index)
        sample_probability = train_weight / jnp.maximum(train_weight.sum(), 1.0)

        def loss_fn(params: Any, batch_inputs: jax.Array, batch_targets: jax.Array, batch_weight: jax.Array) -> jax.Array:
            error = ((network.apply(params, batch_inputs) - batch_targets) ** 2).mean(-1)
            return (error * batch_weight).sum() / jnp.maximum(batch_weight.sum(), 1.0)

        def train_step(step: jax.Array, carry: tuple[Any, Any, jax.Array]) -> tuple[Any, Any, jax.Array]:
            params, opt_state, total = carry
            rows = jax.random.choice(
                jax.random.fold_in(batch_key, step), count, (self.batch_size,), p=sample_probability
            )
            batch_inputs, batch_targets = standardise(rows)
            loss, grads = jax.value_and_grad(loss_fn)(
                params, batch_inputs, batch_targets, jnp.ones((self.batch_size,), jnp.float32)
            )
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, total + loss

        bar_holder: dict = {}

        def run_round(loop: _Loop) -> _Loop:
            first = loop.round * self.eval_every
            last = jnp.minimum(first + self.eval_every, self.steps)
            params, opt_state, total = jax.lax.fori_loop(
                first, last, train_step, (loop.params, loop.opt_state, jnp.float32(0.0))
            )
            train_loss = total / (last - first)
            holdout_loss = loss_fn(params, holdout_inputs, holdout_targets, holdout_weight)
            improved = holdout_loss < loop.best_loss
            if self.progress:
                jax.debug.callback(
                    lambda *values: _report_progress(bar_holder, self.rounds, *values),
                    train_loss,
                    holdout_loss,
                    ordered=True,
                )
            return _Loop(
                round=loop.round + 1,
                params=params,
                opt_state=opt_state,
                best_params=jax.tree_util.tree_map(
                    lambda new, old: jnp.where(improved, new, old), params, loop.best_params
                ),
                best_loss=jnp.where(improved, holdout_loss, loop.best_loss),
                best_round=jnp.where(improved, loop.round, loop.best_round),
                stale_rounds=jnp.where(improved, 0, loop.stale_rounds + 1),
                train_loss=loop.train_loss.at[loop.round].set(train_loss),
                holdout_loss=loop.holdout_loss.at[loop.round].set(holdout_loss),
            )

        def keep_going(loop: _Loop) -> jax.Array:
            return (loop.round < self.rounds) & (loop.stale_rounds < self.patience)

        empty_log = jnp.full((self.rounds,), jnp.nan, jnp.float32)
        start = _Loop(
            round=jnp.int32(0),
            params=params,
            opt_state=optimizer.init(params),
            best_params=params,
            best_loss=jnp.float32(jnp.inf),
            best_round=jnp.int32(0),
            stale_rounds=jnp.int32(0),
            train_loss=empty_log,
            holdout_loss=empty_log,
        )
        final = jax.lax.while_loop(keep_going, run_round, start)
        if self.progress:
            jax.debug.callback(
                lambda *values: _close_progress(bar_holder, *values), final.round, final.best_round, ordered=True
            )
        return MLPState(
            params=final.best_params,
            input_mean=input_mean,
            input_scale=input_scale,
            target_mean=target_mean,
            target_scale=target_scale,
            train_loss=final.train_loss,
            holdout_loss=final.holdout_loss,
            best_round=final.best_round,
        )

    def predict(self, state: MLPState, ref: ArrayLike) -> jax.Array:
        """Return ``[B, h, w, C]`` predictions for the reference features."""
        patches = extract_patches(jnp.asarray(ref, jnp.float32), self.patch_size)
        network = self._network(state.target_mean.shape[-1])
        standardised = (patches - state.input_mean) / state.input_scale
        return network.apply(state.params, standardised) * state.target_scale + state.target_mean
