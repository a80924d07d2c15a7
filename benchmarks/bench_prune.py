"""Benchmark: jaxprune's pruning against ``torch.nn.utils.prune``, on the same data in the same process.

* **Global L1, scaling run**: ``jaxprune.global_unstructured`` (O(n) radix selection) against torch's
  ``prune.global_unstructured(..., prune.L1Unstructured)`` and against a full-sort selection in JAX (``jnp.sort``
  for the k-th value, then the same lowest-position-first tie rule), on a 50-leaf pytree of float32 N(0, 1)
  weights at 1M, 10M and 50M parameters, amounts 0.5 and 0.9. Nanoseconds per parameter show whether time grows
  linearly. Each run also checks that torch and jaxprune pruned the same number of entries and how many masks
  entries differ (only ties at the threshold may: torch leaves their order to its sort, spec §4).
* **Local**: ``l1_unstructured`` and ``ln_structured`` (L2 norm of output channels) on one tensor, against torch.
* **Mask memory** per parameter: jaxprune's bool masks against torch's float32 ``weight_mask`` buffers, and what
  each keeps besides the params (torch also holds ``weight = weight_orig * weight_mask``).
* **Sharded**: global pruning over 8 simulated CPU devices against one device, in a subprocess (XLA reads the
  device count once, before JAX starts): time, equality of the masks, and the bytes that cross devices. On a
  machine with fewer cores than simulated devices this measures overhead, not speed-up.

torch runs on fresh modules every time (pruning rewrites them) built outside the timed part; JAX functions are
compiled before timing, and their compile time is reported apart.

    python -m benchmarks.bench_prune --sizes 1M,10M      # python -m benchmarks runs it with the others
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune
from benchmarks import common
from jaxprune import sharding

N_LEAVES = 50
WIDTH = 1000


def parse_size(text: str) -> int:
  """``"50M"`` -> 50_000_000 (also ``k`` and plain integers)."""
  text = text.strip().upper()
  scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
  return int(float(text.rstrip("KMG")) * scale)


def make_leaves(n_params: int, n_leaves: int = N_LEAVES, rows_multiple: int = 1, seed: int = 0) -> list[np.ndarray]:
  """About ``n_params`` float32 N(0, 1) weights in ``n_leaves`` matrices of ``WIDTH`` columns, the rows of each
  leaf a multiple of ``rows_multiple`` (so that they shard evenly)."""
  rows = max(rows_multiple, round(n_params / (n_leaves * WIDTH) / rows_multiple) * rows_multiple)
  rng = np.random.default_rng(seed)
  return [rng.standard_normal((rows, WIDTH), dtype=np.float32) for _ in range(n_leaves)]


def as_params(leaves: Sequence[np.ndarray]) -> dict:
  """A flax-style pytree of the leaves, on JAX's default device."""
  return {f"layer{i:02d}": {"kernel": jnp.asarray(x)} for i, x in enumerate(leaves)}


def jax_global(amount: float):
  # The amount is closed over as a Python float, so k is rounded from the double product as torch does (a traced
  # float32 amount can round one entry differently at these sizes; see jaxprune.amounts).
  return jax.jit(lambda params: jaxprune.global_unstructured(params, amount))


def sort_global(amount: float):
  """The textbook way: sort every score for the k-th value, then prune below it and the first ties at it."""
  def select(params):
    leaves, treedef = jax.tree.flatten(params)
    scores = jnp.concatenate([jnp.abs(x).ravel() for x in leaves])
    k = round(amount * scores.size)
    if k == 0:
      return jax.tree.map(lambda x: jnp.ones(x.shape, bool), params)
    threshold = jnp.sort(scores)[k - 1]
    below = scores < threshold
    ties = scores == threshold
    pruned = below | (ties & (jnp.cumsum(ties, dtype=jnp.int32) <= k - jnp.sum(below, dtype=jnp.int32)))
    parts = jnp.split(pruned, np.cumsum([x.size for x in leaves])[:-1])
    return jax.tree.unflatten(treedef, [~p.reshape(x.shape) for p, x in zip(parts, leaves)])
  return jax.jit(select)


def torch_modules(leaves: Sequence[np.ndarray]) -> list:
  """Fresh modules whose weights share the leaves' memory (torch's pruning rewrites the modules it prunes)."""
  import torch  # pylint: disable=import-outside-toplevel
  modules = []
  for x in leaves:
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.from_numpy(x))
    modules.append(module)
  return modules


def torch_global(modules: list, amount: float) -> list:
  from torch.nn.utils import prune  # pylint: disable=import-outside-toplevel
  prune.global_unstructured([(m, "weight") for m in modules], pruning_method=prune.L1Unstructured, amount=amount)
  return modules


def _compare(jax_masks, modules) -> dict[str, int]:
  """How many entries each pruned, and at how many positions the masks differ."""
  ours = [np.asarray(m) for m in jax.tree.leaves(jax_masks)]
  theirs = [m.weight_mask.numpy() != 0 for m in modules]
  return {"jaxprune_pruned": int(sum(m.size - m.sum() for m in ours)),
          "torch_pruned": int(sum(m.size - m.sum() for m in theirs)),
          "differing_entries": int(sum((a != b).sum() for a, b in zip(ours, theirs)))}


def _memory(jax_masks, modules, n_params: int) -> dict[str, float]:
  """Bytes per parameter: the masks, and everything pruning keeps besides the params."""
  mask_bytes = sum(m.nbytes for m in jax.tree.leaves(jax_masks))
  torch_mask = sum(m.weight_mask.nbytes for m in modules)
  torch_weight = sum(m.weight.nbytes for m in modules)  # weight_orig * weight_mask, kept as a plain attribute
  return {"jaxprune_mask": mask_bytes / n_params, "torch_mask": torch_mask / n_params,
          "jaxprune_kept": mask_bytes / n_params, "torch_kept": (torch_mask + torch_weight) / n_params}


def run_global(n_params: int, amounts: Sequence[float], repeats: int) -> dict[str, Any]:
  """The global comparison at one size: all contenders, every amount, interleaved round by round."""
  leaves = make_leaves(n_params)
  params = as_params(leaves)
  n = sum(x.size for x in leaves)
  out = {"n_params": n, "n_leaves": len(leaves), "amounts": {}}
  for amount in amounts:
    ours, full_sort = jax_global(amount), sort_global(amount)
    compile_s = {"jaxprune": common.compile_seconds(ours, params),
                 "full_sort": common.compile_seconds(full_sort, params)}
    masks, modules = ours(params), torch_global(torch_modules(leaves), amount)
    check = _compare(masks, modules)
    check["full_sort_equals_jaxprune"] = all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(masks), jax.tree.leaves(full_sort(params))))
    if "memory" not in out:
      out["memory"] = _memory(masks, modules, n)
    del masks, modules
    runs = common.interleaved({
        "jaxprune": lambda: common.timed(ours, params),
        "torch": lambda: common.timed(torch_global, torch_modules(leaves), amount),
        "full_sort": lambda: common.timed(full_sort, params),
    }, repeats)
    times = {name: common.summary(r) for name, r in runs.items()}
    out["amounts"][str(amount)] = {
        "times": times, "compile_s": compile_s, "check": check,
        "ns_per_param": {name: t["median_s"] / n * 1e9 for name, t in times.items()},
        "torch_over_jaxprune": times["torch"]["median_s"] / times["jaxprune"]["median_s"],
        "full_sort_over_jaxprune": times["full_sort"]["median_s"] / times["jaxprune"]["median_s"]}
  return out


def run_local(n_params: int, amounts: Sequence[float], repeats: int) -> dict[str, Any]:
  """l1_unstructured and ln_structured (n=2, output channels) on one tensor, jaxprune against torch."""
  from torch.nn.utils import prune  # pylint: disable=import-outside-toplevel
  (leaf,) = make_leaves(n_params, n_leaves=1)
  x = jnp.asarray(leaf)
  out = {"n_params": leaf.size, "shape": list(leaf.shape), "cases": {}}
  for amount in amounts:
    cases = {
        f"l1_unstructured {amount}": (
            jax.jit(lambda x, a=amount: jaxprune.l1_unstructured(x, a)),
            lambda m, a=amount: prune.l1_unstructured(m, "weight", amount=a)),
        f"ln_structured n=2 {amount}": (
            jax.jit(lambda x, a=amount: jaxprune.ln_structured(x, a, 2, axis=0)),
            lambda m, a=amount: prune.ln_structured(m, "weight", amount=a, n=2, dim=0)),
    }
    for name, (ours, theirs) in cases.items():
      compile_s = common.compile_seconds(ours, x)
      (module,) = torch_modules([leaf])
      theirs(module)
      differing = int((np.asarray(ours(x)) != (module.weight_mask.numpy() != 0)).sum())
      runs = common.interleaved({
          "jaxprune": lambda: common.timed(ours, x),
          "torch": lambda: common.timed(theirs, *torch_modules([leaf])),
      }, repeats)
      times = {k: common.summary(r) for k, r in runs.items()}
      out["cases"][name] = {"times": times, "compile_s": compile_s, "differing_entries": differing,
                            "torch_over_jaxprune": times["torch"]["median_s"] / times["jaxprune"]["median_s"]}
  return out


SHARD_LAYOUTS = {  # name: (mesh shape, mesh axes, spec of every kernel)
    "8 devices, rows split": ((8,), ("x",), ("x", None)),
    "8 devices, 2x4 mesh, rows x columns": ((2, 4), ("data", "model"), ("data", "model")),
}


def _sharded_worker(n_params: int, amount: float, repeats: int) -> dict[str, Any]:
  """Runs in a process started with 8 simulated devices: one device against each layout in SHARD_LAYOUTS."""
  from jax.sharding import AxisType, NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel
  leaves = make_leaves(n_params, rows_multiple=8)
  params = as_params(leaves)
  reference = jax_global(amount)
  compile_s = {"1 device": common.compile_seconds(reference, params)}
  expected = reference(params)
  placed, fns, layouts = {"1 device": params}, {"1 device": reference}, {}
  for name, (shape, axes, spec) in SHARD_LAYOUTS.items():
    mesh = jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes))
    placed[name] = jax.device_put(params, NamedSharding(mesh, PartitionSpec(*spec)))
    like = sharding.abstract(placed[name])
    fns[name] = jax.jit(lambda p, like=like: sharding.shard_like(jaxprune.global_unstructured(p, amount), like))
    compile_s[name] = common.compile_seconds(fns[name], placed[name])
    exchanged = sharding.collectives(fns[name], placed[name])
    masks = fns[name](placed[name])
    layouts[name] = {
        "masks_equal_one_device": all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(masks),
                                                                             jax.tree.leaves(expected))),
        "exchanged_bytes": sum(c.nbytes for c in exchanged),
        "gathered_bytes": sum(c.nbytes for c in exchanged if c.op != "all-reduce"),
        "collectives": sorted({c.op for c in exchanged})}
  runs = common.interleaved({name: (lambda name=name: common.timed(fns[name], placed[name])) for name in fns},
                            repeats)
  times = {name: common.summary(r) for name, r in runs.items()}
  base = times["1 device"]["median_s"]
  return {"n_params": sum(x.size for x in leaves), "amount": amount, "devices": jax.device_count(),
          "cpu_cores": os.cpu_count(), "times": times, "compile_s": compile_s, "layouts": layouts,
          "over_one_device": {name: t["median_s"] / base for name, t in times.items()}}


def run_sharded(n_params: int, amount: float, repeats: int) -> dict[str, Any]:
  """:func:`_sharded_worker` in a subprocess with 8 simulated CPU devices."""
  flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, "-m", "benchmarks.bench_prune", "--sharded-worker", str(n_params),
                         "--amount", str(amount), "--repeats", str(repeats)],
                        env=env, cwd=root, capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"sharded benchmark failed:\n{done.stderr[-4000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def run(sizes: Sequence[int] = (10**6, 10**7, 5 * 10**7), amounts: Sequence[float] = (0.5, 0.9),
        repeats: int = 3, local_size: int = 10**7, sharded_size: int = 10**7) -> dict[str, Any]:
  """Every pruning benchmark; a dict of plain data (seconds, bytes per parameter, ratios)."""
  global_runs = [run_global(n, amounts, repeats) for n in sizes]
  return {"global": global_runs, "memory_bytes_per_param": global_runs[0]["memory"],
          "local": run_local(local_size, amounts, repeats),
          "sharded": run_sharded(sharded_size, max(amounts), repeats)}


def _size(n: int) -> str:
  return f"{n / 1e6:g}M"


def format_tables(report: dict[str, Any]) -> str:
  """The report as Markdown tables: scaling, local, memory, sharded."""
  s = common.seconds
  rows = []
  for g in report["global"]:
    for amount, r in g["amounts"].items():
      t, ns = r["times"], r["ns_per_param"]
      rows.append([_size(g["n_params"]), amount, s(t["jaxprune"]["median_s"]), s(t["torch"]["median_s"]),
                   s(t["full_sort"]["median_s"]), f"**{r['torch_over_jaxprune']:.1f}x**",
                   f"{r['full_sort_over_jaxprune']:.1f}x", f"{ns['jaxprune']:.1f} / {ns['torch']:.0f}",
                   s(r["compile_s"]["jaxprune"]),
                   "yes" if r["check"]["jaxprune_pruned"] == r["check"]["torch_pruned"] else "NO",
                   r["check"]["differing_entries"]])
  parts = ["**Global L1 pruning** of a 50-leaf pytree: `jaxprune.global_unstructured` vs torch's "
           "`prune.global_unstructured(..., L1Unstructured)` vs a full-sort selection in JAX (median of "
           "interleaved runs; jit compile time apart)", "",
           common.markdown_table(["params", "amount", "jaxprune", "torch", "full sort", "torch / jaxprune",
                                  "sort / jaxprune", "ns per param (jaxprune / torch)", "jaxprune compile",
                                  "same count", "masks differ at"], rows, right=range(2, 11))]
  local = report["local"]
  rows = [[name, s(r["times"]["jaxprune"]["median_s"]), s(r["times"]["torch"]["median_s"]),
           f"**{r['torch_over_jaxprune']:.1f}x**", r["differing_entries"]] for name, r in local["cases"].items()]
  parts += ["", f"**Local pruning** of one {local['shape'][0]}x{local['shape'][1]} tensor "
                f"({_size(local['n_params'])} params)", "",
            common.markdown_table(["method, amount", "jaxprune", "torch", "torch / jaxprune", "masks differ at"],
                                  rows, right=range(1, 5))]
  m = report["memory_bytes_per_param"]
  parts += ["", "**Memory per pruned parameter** (bytes)", "",
            common.markdown_table(["", "jaxprune", "torch"],
                                  [["mask", f"{m['jaxprune_mask']:.2f} (bool)", f"{m['torch_mask']:.2f} (float32)"],
                                   ["kept besides the params", f"{m['jaxprune_kept']:.2f}",
                                    f"{m['torch_kept']:.2f} (mask + weight_orig * mask)"]], right=(1, 2))]
  sh = report["sharded"]
  rows = [[name, s(t["median_s"]), f"{sh['over_one_device'][name]:.2f}x", s(sh["compile_s"][name]),
           *(["-", "-", "-"] if name == "1 device" else
             ["yes" if sh["layouts"][name]["masks_equal_one_device"] else "NO",
              f"{sh['layouts'][name]['exchanged_bytes'] / 1e6:.2f} MB",
              f"{sh['layouts'][name]['gathered_bytes'] / 1e6:.2f} MB"])]
          for name, t in sh["times"].items()]
  parts += ["", f"**Sharded global pruning**, {_size(sh['n_params'])} params, amount {sh['amount']}, "
                f"{sh['devices']} simulated CPU devices on {sh['cpu_cores']} cores", "",
            common.markdown_table(["layout", "time", "vs 1 device", "compile", "masks equal", "exchanged",
                                   "of which gathers"], rows, right=range(1, 7))]
  return "\n".join(parts)


def plot(report: dict[str, Any], path: str) -> None:
  """Log-log time against size for each contender and amount, with a line of slope 1 (linear time)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  sizes = [g["n_params"] for g in report["global"]]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for amount in report["global"][0]["amounts"]:
    for name, style in (("jaxprune", "o-"), ("torch", "s--"), ("full_sort", "^:")):
      times = [g["amounts"][amount]["times"][name]["median_s"] for g in report["global"]]
      ax.plot(sizes, times, style, label=f"{name.replace('_', ' ')}, amount {amount}")
  first = report["global"][0]["amounts"]
  base = min(r["times"]["jaxprune"]["median_s"] for r in first.values())
  ax.plot(sizes, [base * n / sizes[0] for n in sizes], color="grey", lw=0.8, label="linear in size")
  ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="seconds (median)",
         title="Global L1 pruning, 50 leaves")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=120)
  plt.close(fig)
  common.write_atomically(path, png.getvalue())


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--sizes", default="1M,10M,50M", help="global pruning sizes (default 1M,10M,50M)")
  parser.add_argument("--amounts", default="0.5,0.9")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--local-size", default="10M")
  parser.add_argument("--sharded-size", default="10M")
  parser.add_argument("--sharded-worker", type=parse_size, help=argparse.SUPPRESS)
  parser.add_argument("--amount", type=float, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.sharded_worker:
    print(json.dumps(_sharded_worker(args.sharded_worker, args.amount, args.repeats)))
    return
  report = run([parse_size(n) for n in args.sizes.split(",")], [float(a) for a in args.amounts.split(",")],
               args.repeats, parse_size(args.local_size), parse_size(args.sharded_size))
  print(format_tables(report))


if __name__ == "__main__":
  main()
