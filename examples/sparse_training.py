"""Example 5: sparse training of LeNet on digits at 90% sparsity: dense, gradual magnitude, SNIP, static, SET, RigL.

The same network, data, batches and number of steps for every method; only how the weights are chosen differs:

* **dense**: no pruning (the reference);
* **gradual magnitude** (Zhu & Gupta 2017): dense at first, then every layer pruned along a cubic schedule
  (:func:`jaxprune.schedules.polynomial`, one step per epoch from 10% to 60% of the run) to 90% by L1 magnitude,
  then trained on;
* **SNIP at init** (Lee et al. 2019): one pruning before any training, by ``|w * g|`` on four mini-batches
  (:func:`jaxprune.criteria.snip`), at the ERK budget;
* **static random**: a random mask at the ERK budget, fixed for the whole run (the baseline sparse-from-scratch
  methods must beat);
* **SET** (Mocanu et al. 2018) and **RigL** (Evci et al. 2020): from the same random mask, every
  ``--update-period`` steps drop a cosine-decayed fraction (0.3 at first) of each layer's smallest live weights
  and grow as many, at random (SET) or where the gradient is largest (RigL), until 75% of the run
  (:func:`jaxprune.set_training`, :func:`jaxprune.rigl`).

The sparse-from-scratch methods use the Erdos-Renyi-Kernel budget (:func:`jaxprune.budgets.erk`): 90% of all
kernel weights pruned, small layers kept denser. Every layer keeps its exact count of live weights all along.
Each epoch is one ``lax.scan`` in one compiled call. Dense, gradual magnitude, SNIP and static random share one
compiled loop (the masks are a traced argument; gradual pruning prunes between epochs with
:func:`jaxprune.budgets.prune_to` at a uniform budget), SET and RigL compile one each, and every seed reuses them.

Run: ``python examples/sparse_training.py`` (12 minutes on a loaded 2-core CPU, training dominating;
``--short`` for the CI smoke run, ``--methods`` for a subset).
"""
from __future__ import annotations

import os
import time
from typing import NamedTuple, Optional, Sequence

import common  # examples/common.py; also puts the repository root on sys.path
import jax
import jax.numpy as jnp
import numpy as np
import optax
from rich.table import Table

import jaxprune
from interop import flax_models
from jaxprune import budgets, criteria, schedules

LEARNING_RATE = 1e-3
METHODS = ("dense", "gradual magnitude", "SNIP at init", "static random", "SET", "RigL")


class Result(NamedTuple):
  """One method's figures over the seeds."""
  method: str
  budget: str
  sparsity: float
  accuracies: list
  live_counts_kept: Optional[bool]  # SET / RigL: every layer ended with the live count it started with


def kernel_counts(masks) -> list[int]:
  return [int(np.count_nonzero(m)) for m in jax.tree.leaves(masks) if jaxprune.is_masked(m)]


def results_table(rows: Sequence[Result], steps: int, seeds: int) -> Table:
  table = Table(title=f"LeNet on digits, {steps} steps per run, test accuracy over {seeds} seed(s)")
  for name in ("method", "budget", "sparsity", "accuracy (mean)", "min", "max"):
    table.add_column(name, justify="left" if name in ("method", "budget") else "right")
  for r in rows:
    table.add_row(r.method, r.budget, f"{r.sparsity:.2%}", f"{np.mean(r.accuracies):.2%}",
                  f"{min(r.accuracies):.2%}", f"{max(r.accuracies):.2%}")
  return table


def save_plot(rows: Sequence[Result], path: str, sparsity: float) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")  # no display needed
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
  means = [100 * np.mean(r.accuracies) for r in rows]
  spread = np.array([[m - 100 * min(r.accuracies), 100 * max(r.accuracies) - m] for m, r in zip(means, rows)]).T
  ax.bar(range(len(rows)), means, yerr=spread, capsize=4, color=["grey"] + ["tab:blue"] * (len(rows) - 1))
  ax.set_xticks(range(len(rows)), [r.method for r in rows], rotation=15)
  ax.set_ylim(max(0.0, min(means) - 10), 100)
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(f"LeNet on scikit-learn digits at {sparsity:.0%} sparsity (bars: min to max over seeds)")
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  p = common.ExampleParser(__doc__.splitlines()[0], "CI smoke run: 2 epochs of 512 images, one seed")
  p.add_argument("--out", default="out", help="folder for the plot")
  p.add_argument("--sparsity", type=float, default=0.9, help="target sparsity of the kernels")
  p.add_mode_argument("--epochs", type=int, full=20, short=2, help="training epochs of every method")
  p.add_mode_argument("--seeds", type=int, full=2, short=1, help="runs per method (initialisation and batches)")
  p.add_mode_argument("--update-period", type=int, full=20, short=4, help="steps between SET/RigL mask updates")
  p.add_mode_argument("--train-images", type=int, full=0, short=512, help="training images used (0: all)")
  p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                 help="the methods to run (default: all; SET and RigL compile a training loop each)")
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)

  data = common.load_digits(seed=args.seed)
  if args.train_images:  # the smoke run checks compilation and counts more than learning: fewer steps
    data = data._replace(x_train=data.x_train[:args.train_images], y_train=data.y_train[:args.train_images])
  model = flax_models.LeNet()
  init = common.initializer(model, data.x_train)
  n = len(data.y_train)
  steps_per_epoch = n // common.BATCH_SIZE
  steps = steps_per_epoch * args.epochs
  end = int(0.75 * steps)  # RigL stops changing the masks at 75% of training
  drop_fraction = optax.cosine_decay_schedule(0.3, end)
  # Zhu & Gupta: prune at the start of epochs 10%..60% of the run along the cubic, train on at 90% after.
  first = max(1, round(0.1 * args.epochs))
  gradual = schedules.polynomial(args.sparsity, begin=first - 1, end=max(first, round(0.6 * args.epochs)))
  apply = common.logits_fn(model)
  x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)

  @jax.jit
  def snip_scores(params, batch):
    """SNIP's |w * g| on one batch (4 mini-batches)."""
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        apply(p, {}, x[batch], True)[0], y[batch]).mean()
    return criteria.snip(params, jax.grad(loss)(params))

  # Pruning to a budget by the smallest scores: one compiled function for SNIP's scores, random ones, and the
  # magnitudes of gradual pruning (budget, masks and scores are all traced).
  prune_to = jax.jit(lambda params, budget, masks, scores: budgets.prune_to(params, budget, masks=masks,
                                                                            importance_scores=scores))
  masked = jaxprune.masked_optimizer(optax.adam(LEARNING_RATE))  # masks passed at every step, traced
  trains = {"masked": common.make_train(model, masked, data.x_train, data.y_train)}

  def dynamic(name, masks, key):
    kwargs = dict(update_period=args.update_period, end=end, drop_fraction=drop_fraction)
    opt = (jaxprune.set_training(optax.adam(LEARNING_RATE), masks, key=key, **kwargs) if name == "SET"
           else jaxprune.rigl(optax.adam(LEARNING_RATE), masks, **kwargs))
    if name not in trains:  # one compiled loop per method: the optimizer's update is traced once
      trains[name] = common.make_train(model, opt, data.x_train, data.y_train)
    return opt, trains[name]

  def as_arrays(tree):  # UNMASKED as a jax array, as the compiled loops return it: no second compilation
    return jax.tree.map(jnp.asarray, tree)

  methods = [m for m in METHODS if m in args.methods]
  accuracies = {m: [] for m in methods}
  losses = {}  # per method, the mean training loss of each epoch (last seed)
  final_masks, kept = {}, {}
  predict = common.make_predict(model)
  start = time.perf_counter()
  with common.progress(args.seeds * len(methods), "training") as advance:
    for seed in range(args.seed, args.seed + args.seeds):
      rng = np.random.default_rng(seed)
      key = jax.random.key(seed)
      params = init(key)["params"]
      epochs = common.epoch_indices(rng, n, common.BATCH_SIZE, args.epochs).reshape(args.epochs, steps_per_epoch, -1)
      everything = as_arrays(jaxprune.init_masks(params))
      erk = budgets.erk(params, args.sparsity)
      random_scores = jax.tree.map(lambda w: rng.random(w.shape, np.float32), params)
      random_masks = prune_to(params, erk, everything, random_scores)
      snip = snip_scores(params, epochs[0, :4].ravel())
      start_masks = {"dense": everything, "gradual magnitude": everything,
                     "SNIP at init": prune_to(params, erk, everything, snip), "static random": random_masks,
                     "SET": random_masks, "RigL": random_masks}
      for method in methods:
        masks = start_masks[method]
        if method in ("SET", "RigL"):
          opt, train = dynamic(method, masks, jax.random.fold_in(key, 1))
        else:
          opt, train = masked, trains["masked"]
        p = jaxprune.apply_masks(params, masks)
        state = common.TrainState(p, {}, as_arrays(opt.init(p)))
        for e, indices in enumerate(epochs):
          if method == "gradual magnitude" and float(gradual(e)) > float(gradual(e - 1)):
            masks = prune_to(state.params, budgets.uniform(params, gradual(e)), masks, state.params)
            state = state._replace(params=jaxprune.apply_masks(state.params, masks))
          update_args = {} if method in ("SET", "RigL") else {"masks": masks}
          state, metrics = train(state, indices, **update_args)
          losses.setdefault(method, {})[e] = metrics["loss"]
        if method in ("SET", "RigL"):
          masks = jaxprune.masks_from_state(state.opt_state)
          kept[method] = kept.get(method, True) and kernel_counts(masks) == kernel_counts(random_masks)
        logits = predict(jaxprune.apply_masks(state.params, masks), {}, data.x_test)
        accuracies[method].append(common.accuracy(logits, data.y_test))
        final_masks[method] = masks
        losses[method] = [float(np.mean(losses[method][e])) for e in range(args.epochs)]
        advance(f"{method}: {accuracies[method][-1]:.2%}", description=f"seed {seed}")
  seconds = time.perf_counter() - start

  total = sum(kernel_counts(jaxprune.init_masks(params)))
  budget_of = {"dense": "-", "gradual magnitude": "uniform"}
  rows = [Result(m, budget_of.get(m, "ERK"), 1 - sum(kernel_counts(final_masks[m])) / total, accuracies[m],
                 kept.get(m)) for m in methods]
  common.console.print(results_table(rows, steps, args.seeds))
  plot = os.path.join(args.out, "sparse_training.png")
  save_plot(rows, plot, args.sparsity)
  common.console.print(f"SET and RigL kept every layer's live count: {all(kept.values())}. "
                       f"All runs: {seconds:.0f} s, compilation included. Plot: {plot}")
  return {"rows": [r._asdict() for r in rows], "steps": steps, "seconds": seconds, "plot": plot,
          "per_layer_live": {m: kernel_counts(final_masks[m]) for m in methods}, "epoch_losses": losses,
          "erk_counts": kernel_counts(random_masks)}


if __name__ == "__main__":
  main()
