"""Benchmark: the cost of keeping pruned weights pruned, on one jitted training step of a ~10M-parameter MLP.

Plain ``optax.adamw`` against the same optimizer wrapped by ``jaxprune.masked_optimizer`` (masks held in the state,
or passed as an extra argument at every step) and by ``jaxprune.scheduled_pruning`` (on a step where the schedule
does not prune: the price of carrying a schedule), all at 50% sparsity. The variants are timed in the same run,
interleaved round by round so that machine noise hits them alike; each figure is the median (and the minimum, which
resists load from other processes best) over rounds of the mean step time within a round. Both the whole training step (forward, backward, update) and the update alone are timed.

    python -m benchmarks.bench_optim                    # 10M parameters
    python -m benchmarks.bench_optim --n-params 1000000 # smaller

``run(n_params)`` returns the figures as a dict for a suite runner.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

import jaxprune
from jaxprune import schedules
from jaxprune.optim import masked_optimizer, masks_from_state
from jaxprune.optim_pruning import scheduled_pruning

IN, OUT, BATCH, HIDDEN_LAYERS = 1024, 16, 64, 3


def _hidden_width(n_params: int) -> int:
  # IN*h + (HIDDEN_LAYERS - 1)*h^2 + h*OUT ~ n_params
  a, b = HIDDEN_LAYERS - 1, IN + OUT
  return max(8, int((-b + math.sqrt(b * b + 4 * a * n_params)) / (2 * a)) // 8 * 8)


def make_model(n_params: int, seed: int = 0):
  """MLP params (flax layout) with about ``n_params`` parameters, a batch, and the loss."""
  h = _hidden_width(n_params)
  dims = [IN] + [h] * HIDDEN_LAYERS + [OUT]
  keys = jax.random.split(jax.random.PRNGKey(seed), len(dims) + 1)
  params = {f"dense{i}": {"kernel": jax.random.normal(k, (d_in, d_out), jnp.float32) / math.sqrt(d_in),
                          "bias": jnp.zeros((d_out,), jnp.float32)}
            for i, (k, d_in, d_out) in enumerate(zip(keys, dims[:-1], dims[1:]))}
  x = jax.random.normal(keys[-2], (BATCH, IN), jnp.float32)
  y = jax.random.normal(keys[-1], (BATCH, OUT), jnp.float32)

  def loss_fn(params, x, y):
    h = x
    for i in range(len(dims) - 1):
      h = h @ params[f"dense{i}"]["kernel"] + params[f"dense{i}"]["bias"]
      if i < len(dims) - 2:
        h = jax.nn.relu(h)
    return jnp.mean((h - y) ** 2)

  return params, (x, y), loss_fn


def _variants(masks) -> dict[str, tuple[optax.GradientTransformation, bool]]:
  """name: (optimizer, whether masks are passed to update as an extra argument)."""
  adamw = lambda: optax.adamw(1e-4, weight_decay=1e-4)  # noqa: E731
  own = lambda: jax.tree.map(jnp.copy, masks)  # noqa: E731  (the state is donated: each variant needs its own)
  return {
      "optax.adamw": (adamw(), False),
      "masked_optimizer, masks in state": (masked_optimizer(adamw(), own()), False),
      "masked_optimizer, masks as extra arg": (masked_optimizer(adamw(), own()), True),
      "scheduled_pruning, non-pruning step": (
          scheduled_pruning(adamw(), schedules.one_shot(0.5, step=10**9), "global_unstructured"), False),
  }


def _steps(opt, loss_fn, pass_masks: bool) -> tuple[Callable, Callable]:
  """Jitted (train step, update-only step); the masks are an argument (not a baked-in constant) of both."""
  def update(grads, state, params, masks):
    extra = {"masks": masks} if pass_masks else {}
    updates, state = opt.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  def train(params, state, batch, masks):
    return update(jax.grad(loss_fn)(params, *batch), state, params, masks)

  return jax.jit(train, donate_argnums=(0, 1)), jax.jit(update, donate_argnums=(1, 2))


def _time(fn: Callable[[], Any], iters: int) -> float:
  start = time.perf_counter()
  for _ in range(iters):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / iters


def run(n_params: int = 10_000_000, rounds: int = 9, iters: int = 5, sparsity: float = 0.5) -> dict:
  """Times every variant; returns ``{"machine": ..., "n_params": ..., "results": {name: {...}}}`` (seconds)."""
  params, batch, loss_fn = make_model(n_params)
  masks = jax.jit(lambda p: jaxprune.global_unstructured(p, sparsity))(params)
  params = jaxprune.apply_masks(params, masks)
  grads = jax.jit(jax.grad(loss_fn))(params, *batch)
  variants = _variants(masks)
  live = {}
  for name, (opt, pass_masks) in variants.items():
    train, update = _steps(opt, loss_fn, pass_masks)
    p = jax.tree.map(jnp.copy, params)
    state = opt.init(p)
    p, state = train(p, state, batch, masks)  # compile, and leave init-time constants behind
    live[name] = {"train": train, "update": update, "params": p, "state": state}
  times = {name: {"train": [], "update": []} for name in variants}

  def advance(name, kind):
    v = live[name]
    if kind == "train":
      v["params"], v["state"] = v["train"](v["params"], v["state"], batch, masks)
    else:
      v["params"], v["state"] = v["update"](grads, v["state"], v["params"], masks)
    return v["params"]

  for name in variants:  # compile the update-only steps too
    jax.block_until_ready(advance(name, "update"))
  for _ in range(rounds):
    for kind in ("train", "update"):
      for name in variants:
        times[name][kind].append(_time(lambda: advance(name, kind), iters))
  results = {}
  for stat, fn in (("median", statistics.median), ("min", min)):
    base = {kind: fn(times["optax.adamw"][kind]) for kind in ("train", "update")}
    for name in variants:
      r = results.setdefault(name, {})
      for kind in ("train", "update"):
        value = fn(times[name][kind])
        r[f"{kind}_{stat}_s"] = value
        r[f"{kind}_{stat}_ratio"] = value / base[kind]
  check = masks_from_state(live["masked_optimizer, masks in state"]["state"])
  pruned_max = max(float(jnp.max(jnp.abs(jnp.where(m, 0.0, p)))) for p, m in
                   zip(jax.tree.leaves(live["masked_optimizer, masks in state"]["params"]), jax.tree.leaves(check))
                   if jaxprune.is_masked(m))
  return {"machine": machine(), "n_params": sum(x.size for x in jax.tree.leaves(params)),
          "batch": BATCH, "sparsity": sparsity, "rounds": rounds, "iters": iters,
          "pruned_weights_max_abs_after_run": pruned_max, "results": results}


def machine() -> str:
  return (f"{platform.machine()} {platform.processor() or ''} CPU, {os.cpu_count()} cores visible, "
          f"{jax.devices()[0].platform}; jax {jax.__version__}, optax {optax.__version__}").replace("  ", " ")


def format_table(report: dict) -> str:
  lines = [f"One jitted step, {report['n_params'] / 1e6:.1f}M-parameter MLP, batch {report['batch']}, "
           f"{report['sparsity']:.0%} sparsity; {report['machine']}",
           f"{report['rounds']} interleaved rounds x {report['iters']} steps: median (min) over rounds, ms",
           "",
           "| optimizer | train step | ratio | update only | ratio |",
           "|---|---:|---:|---:|---:|"]
  for name, r in report["results"].items():
    cells = [f"{r[f'{kind}_median_s'] * 1e3:.1f} ({r[f'{kind}_min_s'] * 1e3:.1f}) | "
             f"{r[f'{kind}_median_ratio']:.3f} ({r[f'{kind}_min_ratio']:.3f})" for kind in ("train", "update")]
    lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n-params", type=int, default=10_000_000)
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--iters", type=int, default=5)
  args = parser.parse_args()
  print(format_table(run(args.n_params, rounds=args.rounds, iters=args.iters)))


if __name__ == "__main__":
  main()
