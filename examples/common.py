"""What the examples share: the digits data, a jitted training loop, evaluation, progress bars and the torch check.

The data is scikit-learn's handwritten digits (1,797 real 8x8 scans, shipped inside scikit-learn, so nothing is
downloaded), scaled up 4x to the 32x32 input of the PyTorch tutorial's LeNet.

Training runs a whole epoch (or a whole run) as one ``lax.scan`` inside one ``jit``: on a CPU the per-step Python
dispatch would otherwise cost more than LeNet's forward and backward pass. The shuffled batch indices go in as an
array and the images are gathered inside the loop, so the data crosses to the device once.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

# Run from a checkout without installing: the examples import jaxprune and interop from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402

PyTree = Any
BATCH_SIZE = 64
console = Console()


class Digits(NamedTuple):
  """Train and test splits: images NHWC float32 (N, 32, 32, 1), standardised; labels int32."""
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def load_digits(test_fraction: float = 0.2, seed: int = 0, channels: int = 1) -> Digits:
  """scikit-learn's digits, upscaled to 32x32 (nearest neighbour) and split with a fixed seed.

  Args:
    test_fraction: the share of images held out for testing (stratified by class).
    seed: the split's seed.
    channels: 1 for LeNet; 3 repeats the grey channel for models built for RGB (ResNet).
  """
  from sklearn import datasets, model_selection  # pylint: disable=import-outside-toplevel
  digits = datasets.load_digits()
  images = np.kron(digits.images, np.ones((4, 4))).astype(np.float32)[..., None]  # (N, 32, 32, 1)
  images = np.repeat(images, channels, axis=-1)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      images, digits.target.astype(np.int32), test_size=test_fraction, random_state=seed, stratify=digits.target)
  mean, std = x_train.mean(), x_train.std()  # statistics of the training split only
  return Digits((x_train - mean) / std, y_train, (x_test - mean) / std, y_test)


def initializer(model, x: np.ndarray) -> Callable[[jax.Array], dict]:
  """``key -> variables`` of a Flax model for inputs shaped like ``x``, compiled once: eager Flax init dispatches
  op by op, which takes seconds on a CPU."""
  return jax.jit(lambda key: model.init(key, jnp.zeros((1, *x.shape[1:]), x.dtype)))


def epoch_indices(rng: np.random.Generator, n: int, batch_size: int, epochs: int = 1) -> np.ndarray:
  """Shuffled batch indices of shape ``(epochs * n // batch_size, batch_size)`` (the last partial batch dropped,
  so every step has one static shape and the loop compiles once)."""
  per_epoch = n // batch_size
  return np.concatenate([rng.permutation(n)[:per_epoch * batch_size].reshape(per_epoch, batch_size)
                         for _ in range(epochs)])


class TrainState(NamedTuple):
  """What the training loop carries: the params, the other variable collections (BatchNorm's ``batch_stats``;
  empty for LeNet) and the optimizer state."""
  params: PyTree
  extra: dict
  opt_state: optax.OptState


def logits_fn(model) -> Callable[..., tuple[jax.Array, dict]]:
  """``(params, extra, x, train) -> (logits, new extra)`` for a Flax model with or without BatchNorm."""
  def apply(params, extra, x, train):
    variables = {"params": params, **extra}
    if "batch_stats" not in extra:
      return model.apply(variables, x), extra
    if not train:
      return model.apply(variables, x, train=False), extra
    logits, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return logits, {**extra, **updated}
  return apply


def make_train(model, optimizer: optax.GradientTransformation, x: np.ndarray, y: np.ndarray,
               observe: Optional[Callable[[TrainState], PyTree]] = None):
  """A jitted ``train(state, indices, **update_args) -> (state, metrics)`` running one step per row of indices.

  ``metrics`` stacks, per step, the loss (``"loss"``) and whatever ``observe(state)`` returns after the step (e.g.
  the sparsity reached), so a whole run can stay inside one compiled loop and still be checked step by step.
  ``update_args`` go to ``optimizer.update`` at every step (e.g. ``masks=`` for :func:`jaxprune.masked_optimizer`);
  they are traced, so new masks do not recompile.
  """
  apply = logits_fn(model)
  x, y = jnp.asarray(x), jnp.asarray(y)

  def loss_fn(params, extra, xb, yb):
    logits, extra = apply(params, extra, xb, True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), extra

  @jax.jit
  def train(state: TrainState, indices: jax.Array, **update_args):
    def step(state, idx):
      (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.extra, x[idx], y[idx])
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **update_args)
      state = TrainState(optax.apply_updates(state.params, updates), extra, opt_state)
      return state, {"loss": loss, **(observe(state) if observe is not None else {})}
    return jax.lax.scan(step, state, indices)

  return train


def fit(train, state: TrainState, rng: np.random.Generator, n: int, epochs: int, advance: Callable[[str], None],
        batch_size: int = BATCH_SIZE, **update_args) -> TrainState:
  """``epochs`` epochs of ``train`` (one compiled call each), reporting each epoch's mean loss to ``advance``."""
  for _ in range(epochs):
    state, metrics = train(state, epoch_indices(rng, n, batch_size), **update_args)
    advance(f"loss {float(metrics['loss'].mean()):.3f}")
  return state


def make_predict(model) -> Callable[[PyTree, dict, np.ndarray], jax.Array]:
  """A jitted ``predict(params, extra, x) -> logits`` in inference mode."""
  apply = logits_fn(model)
  return jax.jit(lambda params, extra, x: apply(params, extra, x, False)[0])


def accuracy(logits: Any, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(np.asarray(logits), axis=-1) == labels))


@contextlib.contextmanager
def progress(total: int, description: str) -> Iterator[Callable[..., None]]:
  """A progress bar over ``total`` steps; yields ``advance(info, description=None)`` (info: loss, accuracy)."""
  bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                 TextColumn("{task.fields[info]}"), console=console)
  with bar:
    task = bar.add_task(description, total=total, info="")

    def advance(info: str, description: Optional[str] = None) -> None:
      bar.update(task, advance=1, info=info, **({} if description is None else {"description": description}))

    yield advance


def torch_logits(torch_model, x_nhwc: np.ndarray) -> np.ndarray:
  """A torch model's logits for NHWC images (torch takes NCHW), in eval mode and without autograd."""
  import torch  # pylint: disable=import-outside-toplevel
  x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
  torch_model.eval()
  with torch.no_grad():
    return torch_model(x).numpy()


class ExampleParser(argparse.ArgumentParser):
  """The examples' command line: ``--short`` (the CI smoke mode), ``--seed``, and options whose default depends
  on the mode (:meth:`add_mode_argument`)."""

  def __init__(self, description: str, short_help: str):
    super().__init__(description=description)
    self.add_argument("--short", action="store_true", help=short_help)
    self.add_argument("--seed", type=int, default=0, help="seed of the initialisation, shuffling and split")
    self._mode_defaults: dict[str, tuple[Any, Any]] = {}

  def add_mode_argument(self, flag: str, *, full: Any, short: Any, help: str, **kwargs) -> None:  # noqa: A002
    action = self.add_argument(flag, default=None, help=f"{help} (default {full}; with --short {short})", **kwargs)
    self._mode_defaults[action.dest] = (full, short)

  def parse_args(self, args: Optional[Sequence[str]] = None, namespace=None):
    parsed = super().parse_args(args, namespace)
    for dest, (full, short) in self._mode_defaults.items():
      if getattr(parsed, dest) is None:
        setattr(parsed, dest, short if parsed.short else full)
    return parsed
