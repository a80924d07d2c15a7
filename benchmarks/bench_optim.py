"""Benchmark: the cost of keeping pruned weights pruned, on one jitted training step of a ~10M-parameter MLP.

Plain ``optax.adamw`` against the same optimizer wrapped by ``jaxprune.masked_optimizer`` (masks held in the state,
or passed as an extra argument at every step) and by ``jaxprune.scheduled_pruning`` (on steps where the schedule
does not prune: the price of carrying a schedule), at 50% sparsity. The variants are timed in the same run,
interleaved round by round (in rotating order) so that machine noise hits them alike; each figure is the median (and the minimum, which
resists load from other processes best) over rounds of the mean step time within a round. The whole training step
(forward, backward, update) is timed at two batch sizes, and the update alone.

Minor page faults per step are reported too: XLA:CPU allocates a step's scratch memory with ``malloc``, and glibc
serves blocks over 32 MiB with a fresh ``mmap`` on every call, so every page of scratch is faulted in again at each
step once the step's scratch passes 32 MiB. ``scheduled_pruning``'s pruning branch (under ``lax.cond``) enlarges
the scratch even on steps where it does not run, which can push a step over that line.

    python -m benchmarks.bench_optim                    # 10M parameters
    python -m benchmarks.bench_optim --n-params 1000000 # smaller

``run(n_params)`` returns the figures as a dict for a suite runner.
"""
from __future__ import annotations

import argparse
import math
import resource
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import optax

import jaxprune
from jaxprune import schedules
from jaxprune.optim import masked_optimizer
from jaxprune.optim_pruning import scheduled_pruning
from benchmarks.common import cpu_summary

IN, OUT, HIDDEN_LAYERS = 1024, 16, 3
BASELINE = "optax.adamw"


def _hidden_width(n_params: int) -> int:
  # IN*h + (HIDDEN_LAYERS - 1)*h^2 + h*OUT ~ n_params
  a, b = HIDDEN_LAYERS - 1, IN + OUT
  return max(8, int((-b + math.sqrt(b * b + 4 * a * n_params)) / (2 * a)) // 8 * 8)


def make_model(n_params: int, batch: int, seed: int = 0):
  """MLP params (flax layout) with about ``n_params`` parameters, one batch, and the loss."""
  h = _hidden_width(n_params)
  dims = [IN] + [h] * HIDDEN_LAYERS + [OUT]
  keys = jax.random.split(jax.random.PRNGKey(seed), len(dims) + 1)
  params = {f"dense{i}": {"kernel": jax.random.normal(k, (d_in, d_out), jnp.float32) / math.sqrt(d_in),
                          "bias": jnp.zeros((d_out,), jnp.float32)}
            for i, (k, d_in, d_out) in enumerate(zip(keys, dims[:-1], dims[1:]))}
  data = (jax.random.normal(keys[-2], (batch, IN), jnp.float32), jax.random.normal(keys[-1], (batch, OUT)))

  def loss_fn(params, x, y):
    h = x
    for i in range(len(dims) - 1):
      h = h @ params[f"dense{i}"]["kernel"] + params[f"dense{i}"]["bias"]
      if i < len(dims) - 2:
        h = jax.nn.relu(h)
    return jnp.mean((h - y) ** 2)

  return params, data, loss_fn


def _variants(masks) -> dict[str, tuple[optax.GradientTransformation, bool]]:
  """name: (optimizer, whether masks are passed to update as an extra argument)."""
  adamw = lambda: optax.adamw(1e-4, weight_decay=1e-4)  # noqa: E731
  own = lambda: jax.tree.map(jnp.copy, masks)  # noqa: E731  (the state is donated: each variant needs its own)
  return {
      BASELINE: (adamw(), False),
      "masked_optimizer, masks in state": (masked_optimizer(adamw(), own()), False),
      "masked_optimizer, masks as extra arg": (masked_optimizer(adamw(), own()), True),
      "scheduled_pruning, non-pruning step": (
          scheduled_pruning(adamw(), schedules.one_shot(0.5, step=10**9), "global_unstructured", masks=own()),
          False),
  }


def _step(opt, loss_fn, pass_masks: bool, train: bool) -> Callable:
  """A jitted step ``(params, state, data, masks) -> (params, state)``; masks are an argument, not a constant.

  With ``train`` it computes the gradient from ``data``; otherwise ``data`` is the gradient (update only)."""
  def step(params, state, data, masks):
    grads = jax.grad(loss_fn)(params, *data) if train else data
    updates, state = opt.update(grads, state, params, **({"masks": masks} if pass_masks else {}))
    return optax.apply_updates(params, updates), state
  return jax.jit(step, donate_argnums=(0, 1))


def _faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _measure(n_params: int, batch: int, sparsity: float, rounds: int, iters: int, train: bool) -> dict:
  params, data, loss_fn = make_model(n_params, batch)
  masks = jax.jit(lambda p: jaxprune.global_unstructured(p, sparsity))(params)
  params = jaxprune.apply_masks(params, masks)
  if not train:
    data = jax.jit(jax.grad(loss_fn))(params, *data)
  live = {}
  for name, (opt, pass_masks) in _variants(masks).items():
    step = _step(opt, loss_fn, pass_masks, train)
    p = jax.tree.map(jnp.copy, params)
    live[name] = [step, *step(p, opt.init(p), data, masks)]  # compiled, and past init-time constants
  times = {name: [] for name in live}
  faults = {name: [] for name in live}
  names = list(live)
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:  # rotate: no variant always runs first
      step, p, state = live[name]
      start, faults_before = time.perf_counter(), _faults()
      for _ in range(iters):
        p, state = step(p, state, data, masks)
      jax.block_until_ready(p)
      times[name].append((time.perf_counter() - start) / iters)
      faults[name].append((_faults() - faults_before) / iters)
      live[name][1:] = [p, state]
  base = {"median": statistics.median(times[BASELINE]), "min": min(times[BASELINE])}
  return {name: {"median_s": statistics.median(t), "min_s": min(t),
                 "median_ratio": statistics.median(t) / base["median"], "min_ratio": min(t) / base["min"],
                 "faults_per_step": statistics.median(faults[name])}
          for name, t in times.items()}


def run(n_params: int = 10_000_000, batches: tuple[int, ...] = (64, 256), rounds: int = 9, iters: int = 5,
        sparsity: float = 0.5) -> dict:
  """Times every variant; returns ``{"machine", "n_params", ..., "results": {setting: {variant: figures}}}``."""
  results = {f"train step, batch {b}": _measure(n_params, b, sparsity, rounds, iters, train=True) for b in batches}
  results["update only"] = _measure(n_params, batches[0], sparsity, rounds, iters, train=False)
  params, _, _ = make_model(n_params, 1)
  return {"machine": machine(), "n_params": sum(x.size for x in jax.tree.leaves(params)), "sparsity": sparsity,
          "rounds": rounds, "iters": iters, "results": results}


def machine() -> str:
  return (f"{cpu_summary()}, {jax.devices()[0].platform} backend; "
          f"jax {jax.__version__}, optax {optax.__version__}")


def format_table(report: dict) -> str:
  lines = [f"{report['n_params'] / 1e6:.1f}M-parameter MLP, {report['sparsity']:.0%} sparsity, "
           f"{report['machine']}; {report['rounds']} interleaved rounds x {report['iters']} steps, "
           "median (min) over rounds", "",
           "| step | optimizer | ms | ratio to optax.adamw | page faults / step |",
           "|---|---|---:|---:|---:|"]
  for setting, variants in report["results"].items():
    for name, r in variants.items():
      lines.append(f"| {setting} | {name} | {r['median_s'] * 1e3:.1f} ({r['min_s'] * 1e3:.1f}) | "
                   f"{r['median_ratio']:.2f} ({r['min_ratio']:.2f}) | {r['faults_per_step']:.0f} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n-params", type=int, default=10_000_000)
  parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--iters", type=int, default=5)
  args = parser.parse_args()
  print(format_table(run(args.n_params, tuple(args.batches), rounds=args.rounds, iters=args.iters)))


if __name__ == "__main__":
  main()
