"""Example 3: gradual pruning (Zhu & Gupta 2017) of LeNet on digits, the whole run in one compiled loop.

Zhu & Gupta, "To prune, or not to prune": raise every layer's sparsity from 0 to s_f along a cubic,

    s_t = s_f * (1 - (1 - (t - t0) / (t1 - t0))^3),   pruning every `frequency` steps from t0 to t1,

while training goes on, so the network adapts as it loses weights: fast early, when there are many redundant
weights, slowly at the end. :func:`jaxprune.scheduled_pruning` does it inside the optimizer update: the schedule is
evaluated on the traced step and the pruning runs under ``lax.cond``, so all the steps below, dense warm-up, pruning
and recovery, are one ``lax.scan`` in one ``jit``, compiled once.

Each layer is pruned on its own (L1), to exactly ``round(s_t * n)`` of its ``n`` weights at every step. The
example records the sparsity after every step inside the loop and checks it against the schedule.

Run: ``python examples/gradual_pruning.py`` (``--short`` for the CI smoke run).
"""
from __future__ import annotations

from typing import Optional, Sequence

import common  # examples/common.py; also puts the repository root on sys.path
import jax
import jax.numpy as jnp
import numpy as np
import optax
from rich.table import Table

import jaxprune
from jaxprune import schedules
from interop import flax_models


def expected_pruned(schedule, steps: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
  """How many weights must be pruned after each step: per layer ``round(s * n)`` with torch's rounding (the
  float32 sparsity times ``n`` in double precision, half to even), summed over layers."""
  targets = np.maximum.accumulate(np.asarray(jax.vmap(schedule)(jnp.asarray(steps)), np.float32))
  return sum(np.round(targets.astype(np.float64) * n).astype(np.int64) for n in sizes)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  p = common.ExampleParser(__doc__.splitlines()[0], "CI smoke run: fewer epochs")
  p.add_argument("--sparsity", type=float, default=0.9, help="final sparsity of every layer (Zhu & Gupta's s_f)")
  p.add_mode_argument("--epochs", type=int, full=30, short=4, help="training epochs")
  args = p.parse_args(argv)

  data = common.load_digits(seed=args.seed)
  rng = np.random.default_rng(args.seed)
  indices = common.epoch_indices(rng, len(data.y_train), common.BATCH_SIZE, args.epochs)
  steps = len(indices)
  # Dense for the first 15% of the steps, pruning until 65%, then recovery at the final sparsity.
  begin, end = int(0.15 * steps), int(0.65 * steps)
  frequency = max((end - begin) // 16, 1)
  schedule = schedules.polynomial(args.sparsity, begin=begin, end=end, frequency=frequency)

  model = flax_models.LeNet()
  params = common.initializer(model, data.x_train)(jax.random.key(args.seed))["params"]
  optimizer = jaxprune.scheduled_pruning(optax.adam(1e-3), schedule, "l1_unstructured")

  def pruned_count(state: common.TrainState) -> jax.Array:
    masks = jaxprune.masks_from_state(state.opt_state)
    return sum(jnp.sum(~m, dtype=jnp.int32) for m in jax.tree.leaves(masks) if jaxprune.is_masked(m))

  train = common.make_train(model, optimizer, data.x_train, data.y_train, observe=lambda s: {"pruned": pruned_count(s)})
  state = common.TrainState(params, {}, optimizer.init(params))
  with common.console.status(f"{steps} steps in one jitted lax.scan (compiling, then running)"):
    state, metrics = train(state, indices)  # the whole run: one call, one compilation
    pruned = np.asarray(metrics["pruned"])

  sizes = [x.size for x in jax.tree.leaves(params) if np.ndim(x) >= 2]
  total = sum(sizes)
  expected = expected_pruned(schedule, np.arange(steps), sizes)
  follows = bool(np.array_equal(pruned, expected))
  masks = jaxprune.masks_from_state(state.opt_state)
  predict = common.make_predict(model)
  acc = common.accuracy(predict(state.params, {}, data.x_test), data.y_test)
  per_layer = {leaf.path: leaf.sparsity for leaf in jaxprune.sparsity_report(state.params, masks).leaves
               if leaf.masked}

  table = Table(title=f"Zhu & Gupta schedule to {args.sparsity:.0%} per layer: pruning every {frequency} steps "
                      f"from step {begin} to {end}")
  for name in ("step", "schedule s_t", "sparsity reached", "loss"):
    table.add_column(name, justify="right")
  shown = sorted({0, begin, *range(begin + frequency, end, 3 * frequency), end, steps - 1})
  for t in shown:
    table.add_row(str(t), f"{float(schedule(t)):.2%}", f"{pruned[t] / total:.2%}", f"{float(metrics['loss'][t]):.3f}")
  common.console.print(table)
  common.console.print(f"Sparsity equals round(s_t * n) of every layer after every one of the {steps} steps: "
                       f"{follows}. Final sparsity {pruned[-1] / total:.2%}, test accuracy {acc:.2%}.")
  return {"steps": steps, "begin": begin, "end": end, "frequency": frequency, "follows_schedule": follows,
          "sparsity": float(pruned[-1] / total), "per_layer_sparsity": per_layer, "accuracy": acc,
          "pruned_per_step": pruned.tolist()}


if __name__ == "__main__":
  main()
