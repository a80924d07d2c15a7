"""Benchmark: a RigL / SET training step against a plain masked training step, in the same run.

One jitted training step (forward, backward, update) of the ~10M-parameter MLP of ``bench_optim``, at 90% sparsity
(a random mask at the ERK budget), with ``optax.adam``:

* ``masked_optimizer`` (static sparse training): the baseline;
* RigL and SET on a step that does not update the masks (the price of carrying the transform: a ``lax.cond``
  whose mask-update branch does not run);
* RigL and SET on a step that updates the masks (``update_period=1``): per layer, a drop selection over the live
  weights and a grow selection over the inactive ones, with the step itself skipped (``skip_gradients``).

The variants run interleaved round by round (``benchmarks.common.interleaved``) in one process; each figure is
the median (and the minimum) over rounds of the mean step time within a round. With RigL's usual update period
(every 100 steps or more) the update step's cost is spread over the period.

    python -m benchmarks.bench_sparse                     # 10M parameters
    python -m benchmarks.bench_sparse --n-params 1000000  # smaller

``run(n_params)`` returns the figures as a dict for a suite runner.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Callable

import jax
import jax.numpy as jnp
import optax

import jaxprune
from benchmarks.bench_optim import machine, make_model
from benchmarks.common import interleaved, timed
from jaxprune import budgets

BASELINE = "masked_optimizer (static mask)"
NEVER = 2**30  # a start step never reached: the mask-update branch never runs


def _variants(masks) -> dict[str, optax.GradientTransformation]:
  adam = lambda: optax.adam(1e-4)  # noqa: E731
  key = jax.random.key(1)
  return {
      BASELINE: jaxprune.masked_optimizer(adam(), masks),
      "RigL, step without mask update": jaxprune.rigl(adam(), masks, start=NEVER),
      "SET, step without mask update": jaxprune.set_training(adam(), masks, key=key, start=NEVER),
      "RigL, mask-update step": jaxprune.rigl(adam(), masks, update_period=1),
      "SET, mask-update step": jaxprune.set_training(adam(), masks, key=key, update_period=1),
  }


def _case(opt: optax.GradientTransformation, params, data, loss_fn, iters: int) -> Callable[[], float]:
  """A compiled, warmed-up step and a timer of ``iters`` steps (the params and state carried over calls)."""
  @jax.jit
  def step(p, state):
    updates, state = opt.update(jax.grad(loss_fn)(p, *data), state, p)
    return optax.apply_updates(p, updates), state

  carry = [params, jax.tree.map(jnp.asarray, opt.init(params))]
  carry[:] = step(*carry)

  def steps(*c):
    for _ in range(iters):
      c = step(*c)
    carry[:] = c
    return c

  return lambda: timed(steps, *carry) / iters


def run(n_params: int = 10_000_000, batch: int = 64, sparsity: float = 0.9, rounds: int = 7,
        iters: int = 3) -> dict:
  """Times every variant; returns ``{"machine", "n_params", ..., "results": {variant: figures}}``."""
  params, data, loss_fn = make_model(n_params, batch)
  masks = jax.jit(lambda p: budgets.prune_to(p, budgets.erk(p, sparsity), "random_unstructured",
                                             key=jax.random.key(0)))(params)
  params = jaxprune.apply_masks(params, masks)
  cases = {name: _case(opt, params, data, loss_fn, iters) for name, opt in _variants(masks).items()}
  times = interleaved(cases, rounds)
  base = {"median": statistics.median(times[BASELINE]), "min": min(times[BASELINE])}
  results = {name: {"median_s": statistics.median(t), "min_s": min(t),
                    "median_ratio": statistics.median(t) / base["median"], "min_ratio": min(t) / base["min"]}
             for name, t in times.items()}
  return {"machine": machine(), "n_params": sum(x.size for x in jax.tree.leaves(params)), "sparsity": sparsity,
          "batch": batch, "rounds": rounds, "iters": iters, "results": results}


def format_table(report: dict) -> str:
  lines = [f"{report['n_params'] / 1e6:.1f}M-parameter MLP, {report['sparsity']:.0%} sparsity (ERK, random), "
           f"batch {report['batch']}, adam; {report['machine']}; {report['rounds']} interleaved rounds x "
           f"{report['iters']} steps, median (min) over rounds", "",
           f"| training step | ms | ratio to {BASELINE} |", "|---|---:|---:|"]
  for name, r in report["results"].items():
    lines.append(f"| {name} | {r['median_s'] * 1e3:.1f} ({r['min_s'] * 1e3:.1f}) | "
                 f"{r['median_ratio']:.2f} ({r['min_ratio']:.2f}) |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n-params", type=int, default=10_000_000)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--iters", type=int, default=3)
  args = parser.parse_args()
  print(format_table(run(args.n_params, args.batch, rounds=args.rounds, iters=args.iters)))


if __name__ == "__main__":
  main()
