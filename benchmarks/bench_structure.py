"""Benchmark: cost against model structure, what a user waits for on a fresh process.

Real models have hundreds of parameter tensors, so what matters is how pruning's cost grows with the leaf count
at a fixed total size, and what the first call costs in a fresh process (import excluded, tracing, compiling and
running included). Every contender runs in its own fresh process for each structure:

* ``jaxprune``: ``jaxprune.global_unstructured(params, 0.5)`` called eagerly, as a script or the CLI does;
* ``jaxprune jit``: the same inside ``jax.jit``, as in a training step (one program for the whole model);
* ``torch``: ``prune.global_unstructured(..., prune.L1Unstructured, amount=0.5)`` on fresh modules;
* ``sort``: the sort-based JAX selection (``jnp.sort`` for the k-th value, then the same tie rule), jitted;
* ``floor``: the least any one-program global prune compiles, jitted: the leaves laid end to end, one compare,
  and the split back into leaves (jaxprune's own, at offsets XLA cannot fold). What ``jaxprune jit`` costs above
  it is what the selection adds, and that is what must not grow with the leaf count.

Structures: a leaf-count sweep (10 to 1,000 equal float32 matrices at a fixed total) and three real shape lists
(ResNet-50's 161 tensors, BERT-base's 199, and a LLaMA-style decoder with 32 layers of 7 weights, scaled down in
width). A second table times compiling one jitted training step (plain ``optax.adam``, ``masked_optimizer``,
``scheduled_pruning`` local and global) against the leaf count, and a third compiles a LLaMA-7B-shaped global
prune and pruning step ahead of time over 8 simulated devices.

    python -m benchmarks.bench_structure --quick
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

import numpy as np

from benchmarks import common

CONTENDERS = ("jaxprune", "jaxprune jit", "torch", "sort", "floor")


def resnet50_shapes() -> list[tuple[int, ...]]:
  """The weight tensors of torchvision's ResNet-50, in Flax layout (HWIO kernels, (in, out) dense)."""
  shapes = [(7, 7, 3, 64), (64,), (64,)]
  cin = 64
  for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
    for b in range(blocks):
      shapes += [(1, 1, cin, width), (width,), (width,), (3, 3, width, width), (width,), (width,),
                 (1, 1, width, 4 * width), (4 * width,), (4 * width,)]
      if b == 0:
        shapes += [(1, 1, cin, 4 * width), (4 * width,), (4 * width,)]
      cin = 4 * width
  return shapes + [(2048, 1000), (1000,)]


def bert_base_shapes() -> list[tuple[int, ...]]:
  """BertModel at base size: embeddings, 12 layers of attention and MLP with their biases and LayerNorms, pooler."""
  d, ff = 768, 3072
  shapes = [(30522, d), (512, d), (2, d), (d,), (d,)]
  for _ in range(12):
    shapes += [(d, d), (d,)] * 4 + [(d,), (d,), (d, ff), (ff,), (ff, d), (d,), (d,), (d,)]
  return shapes + [(d, d), (d,)]


def llama_shapes(width: int = 512, layers: int = 32, vocab: int = 32000, ratio: float = 11008 / 4096):
  """A LLaMA-style decoder: embedding, ``layers`` x (q, k, v, o, gate, up, down + 2 norms), final norm, head."""
  ff = int(width * ratio)
  shapes = [(vocab, width)]
  for _ in range(layers):
    shapes += [(width, width)] * 4 + [(width, ff), (width, ff), (ff, width), (width,), (width,)]
  return shapes + [(width,), (width, vocab)]


def sweep_shapes(n_leaves: int, total: int, width: int = 1000) -> list[tuple[int, ...]]:
  rows = max(1, round(total / (n_leaves * width)))
  return [(rows, width)] * n_leaves


def structure(name: str) -> list[tuple[int, ...]]:
  """``"sweep:500:10M"``, ``"resnet50"``, ``"bert-base"`` or ``"llama-32x512"``."""
  if name.startswith("sweep:"):
    _, leaves, total = name.split(":")
    from benchmarks.bench_prune import parse_size  # pylint: disable=import-outside-toplevel
    return sweep_shapes(int(leaves), parse_size(total))
  return {"resnet50": resnet50_shapes, "bert-base": bert_base_shapes, "llama-32x512": llama_shapes}[name]()


def _arrays(shapes, seed: int = 0) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(s, dtype=np.float32) for s in shapes]


def _worker(contender: str, name: str, repeats: int) -> dict[str, Any]:
  """One contender on one structure, in this (fresh) process: the first call, then the steady median."""
  arrays = _arrays(structure(name))
  if contender == "torch":
    import torch  # pylint: disable=import-outside-toplevel
    from torch.nn.utils import prune  # pylint: disable=import-outside-toplevel

    def call(_):
      modules = []
      for x in arrays:
        module = torch.nn.Module()
        module.weight = torch.nn.Parameter(torch.from_numpy(x))
        modules.append(module)
      start = time.perf_counter()
      prune.global_unstructured([(m, "weight") for m in modules], pruning_method=prune.L1Unstructured, amount=0.5)
      return time.perf_counter() - start
  else:
    import jax  # pylint: disable=import-outside-toplevel
    import jaxprune  # pylint: disable=import-outside-toplevel
    from benchmarks.bench_prune import sort_global  # pylint: disable=import-outside-toplevel
    params = {f"t{i:04d}": jax.numpy.asarray(x) for i, x in enumerate(arrays)}
    where = lambda path, leaf: True  # every tensor takes part, as in the torch call  # noqa: E731
    fn = {"jaxprune": lambda p: jaxprune.global_unstructured(p, 0.5, where=where),
          "jaxprune jit": jax.jit(lambda p: jaxprune.global_unstructured(p, 0.5, where=where)),
          "sort": sort_global(0.5), "floor": jax.jit(_split_floor)}[contender]

    def call(_):
      return common.timed(fn, params)
  first = call(None)
  steady = [call(None) for _ in range(repeats)]
  return {"first_s": first, "steady_s": statistics.median(steady),
          "n_leaves": len(arrays), "n_params": int(sum(x.size for x in arrays))}


def _split_floor(params):
  """Every leaf's mask of ``x > 0``, formed on the leaves laid end to end and cut back as jaxprune cuts them."""
  import jax  # pylint: disable=import-outside-toplevel
  from jaxprune.selection import _split  # pylint: disable=import-outside-toplevel

  leaves, treedef = jax.tree.flatten(params)
  flat = jax.numpy.concatenate([x.ravel() for x in leaves])
  with jax.enable_x64(True):
    masks = _split(flat > 0, [x.shape for x in leaves], like=flat[0])
  return jax.tree.unflatten(treedef, masks)


def _step_worker(kind: str, n_leaves: int, total: int) -> dict[str, Any]:
  """Seconds to trace and compile one jitted training step for ``n_leaves`` equal matrices."""
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import jaxprune  # pylint: disable=import-outside-toplevel
  params = {f"t{i:04d}": jax.numpy.asarray(x) for i, x in enumerate(_arrays(sweep_shapes(n_leaves, total)))}
  opt = {"optax.adam": lambda: optax.adam(1e-3),
         "masked_optimizer": lambda: jaxprune.masked_optimizer(optax.adam(1e-3)),
         "scheduled local": lambda: jaxprune.scheduled_pruning(optax.adam(1e-3), 0.5, "l1_unstructured"),
         "scheduled global": lambda: jaxprune.scheduled_pruning(optax.adam(1e-3), 0.5, "global_unstructured"),
         }[kind]()
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.tree.map(lambda p: p * 0.01, params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return {"compile_s": common.compile_seconds(step, params, state)}


def _llama7b_worker() -> dict[str, Any]:
  """Compiles a LLaMA-7B-shaped global prune and scheduled step over 8 simulated devices, ahead of time."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  import jaxprune  # pylint: disable=import-outside-toplevel
  from jaxprune import sharding  # pylint: disable=import-outside-toplevel
  mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
  d, ff, vocab = 4096, 11008, 32000

  def leaf(shape, spec):
    return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, P(*spec)))
  layer = {"q": leaf((d, d), (None, "model")), "k": leaf((d, d), (None, "model")), "v": leaf((d, d), (None, "model")),
           "o": leaf((d, d), ("model", None)), "gate": leaf((d, ff), (None, "model")),
           "up": leaf((d, ff), (None, "model")), "down": leaf((ff, d), ("model", None)),
           "attn_norm": leaf((d,), (None,)), "mlp_norm": leaf((d,), (None,))}
  params = {"embed": leaf((vocab, d), (None, "model")), "layers": [dict(layer) for _ in range(32)],
            "norm": leaf((d,), (None,)), "lm_head": leaf((d, vocab), (None, "model"))}
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  out = {"n_params": n, "n_leaves": len(jax.tree.leaves(params)), "devices": jax.device_count()}

  def report(name, jitted, *args):
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    exchanged = sharding.collectives(jitted, *args)
    out[name] = {"compile_s": seconds,
                 "argument_gb_per_device": memory.argument_size_in_bytes / 2**30,
                 "output_gb_per_device": memory.output_size_in_bytes / 2**30,
                 "temp_gb_per_device": memory.temp_size_in_bytes / 2**30,
                 "collectives": len(exchanged), "exchanged_mb": sum(c.nbytes for c in exchanged) / 2**20,
                 "gathers": sum(c.op != "all-reduce" for c in exchanged)}

  report("global_unstructured",
         jax.jit(lambda p: sharding.shard_like(jaxprune.global_unstructured(p, 0.5), params)), params)
  opt = jaxprune.scheduled_pruning(optax.sgd(1e-3), 0.5, "global_unstructured")
  treedef = jax.tree.structure(params)

  def placed_like_params(node):  # masks and momenta shard like their params
    if jax.tree.structure(node) != treedef:
      return node
    return jax.tree.map(lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p.sharding)
                        if s.shape == p.shape else s, node, params)
  state = jax.tree.map(placed_like_params, jax.eval_shape(opt.init, params),
                       is_leaf=lambda node: jax.tree.structure(node) == treedef)

  def step(p, s):
    updates, s = opt.update(jax.tree.map(jnp.zeros_like, p), s, p)
    return optax.apply_updates(p, updates), s
  report("scheduled_pruning step", jax.jit(step), params, state)
  return out


def _fresh(args: Sequence[str]) -> dict[str, Any]:
  """``python -m benchmarks.bench_structure ARGS`` in a fresh process; its last stdout line is JSON."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if "--llama7b-worker" in args:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, "-m", "benchmarks.bench_structure", *args], env=env, cwd=root,
                        capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-4000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def run(structures: Sequence[str], step_leaves: Sequence[int] = (10, 100, 500), step_total: int = 10**6,
        repeats: int = 3, llama7b: bool = True, contenders: Sequence[str] = CONTENDERS) -> dict[str, Any]:
  """Every contender on every structure, each in a fresh process, then the training-step compile sweep."""
  report: dict[str, Any] = {"global": {}, "step_compile": {}}
  for name in structures:
    report["global"][name] = {c: _fresh(["--worker", c, name, "--repeats", str(repeats)]) for c in contenders}
  for n in step_leaves:
    report["step_compile"][str(n)] = {
        kind: _fresh(["--step-worker", kind, str(n), str(step_total)])["compile_s"]
        for kind in ("optax.adam", "masked_optimizer", "scheduled local", "scheduled global")}
  if llama7b:
    try:  # its own figures: a failure here must not lose the tables above
      report["llama7b"] = _fresh(["--llama7b-worker"])
    except RuntimeError as err:
      report["llama7b_error"] = str(err)[-2000:]
  return report


def format_table(report: dict[str, Any]) -> str:
  rows = []
  missing = {"first_s": float("nan"), "steady_s": float("nan")}
  s = lambda v: "-" if v != v else common.seconds(v)  # noqa: E731  (a contender left out of the run)
  for name, r in report["global"].items():
    ours, jit, torch, sort, floor = (r.get(c, missing) for c in CONTENDERS)
    size = next(iter(r.values()))
    rows.append([name, size["n_leaves"], f"{size['n_params'] / 1e6:.1f}M", s(ours["first_s"]), s(jit["first_s"]),
                 s(torch["first_s"]), s(sort["first_s"]), s(floor["first_s"]), s(jit["first_s"] - floor["first_s"]),
                 s(ours["steady_s"]), s(jit["steady_s"]),
                 s(torch["steady_s"]), s(sort["steady_s"]),
                 f"**{torch['steady_s'] / jit['steady_s']:.1f}x**", f"{torch['first_s'] / ours['first_s']:.1f}x"])
  parts = ["**Global L1 pruning against model structure**, each contender in a fresh process: first call "
           "(trace + compile + run) and steady median", "",
           common.markdown_table(["structure", "leaves", "params", "first: jaxprune", "first: jaxprune jit",
                                  "first: torch", "first: sort", "first: floor", "first: jit - floor",
                                  "steady: jaxprune", "steady: jaxprune jit", "steady: torch", "steady: sort",
                                  "torch / jit (steady)", "torch / jaxprune (first)"], rows, right=range(1, 15))]
  steps = report["step_compile"]
  kinds = list(next(iter(steps.values())))
  parts += ["", "**Compiling one jitted training step** (trace + compile), equal matrices at a fixed total", "",
            common.markdown_table(["leaves", *kinds], [[n, *(s(v[k]) for k in kinds)] for n, v in steps.items()],
                                  right=range(1, len(kinds) + 1))]
  if "llama7b" in report:
    l7 = report["llama7b"]
    rows = [[name, s(v["compile_s"]), f"{v['argument_gb_per_device']:.2f}", f"{v['output_gb_per_device']:.2f}",
             f"{v['temp_gb_per_device']:.2f}", v["collectives"], f"{v['exchanged_mb']:.1f}", v["gathers"]]
            for name, v in l7.items() if isinstance(v, dict)]
    parts += ["", f"**LLaMA-7B shapes, ahead of time** ({l7['n_params'] / 1e9:.2f}B bf16 params, {l7['n_leaves']} "
                  f"leaves, {l7['devices']} simulated devices, kernels sharded on `model`)", "",
              common.markdown_table(["program", "compile", "args GiB/device", "outputs GiB/device",
                                     "temp GiB/device", "collectives", "exchanged MiB", "gathers"],
                                    rows, right=range(1, 8))]
  return "\n".join(parts)


QUICK = ["sweep:10:1M", "sweep:200:1M"]
FULL = [f"sweep:{n}:10M" for n in (10, 50, 200, 500, 1000)] + ["sweep:10:50M", "sweep:500:50M",
                                                                 "resnet50", "bert-base", "llama-32x512"]


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--structures", help="comma-separated, e.g. sweep:500:10M,resnet50")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--contenders", default=",".join(CONTENDERS))
  parser.add_argument("--step-leaves", default=None, help="leaf counts of the step compile sweep (default 10,100,500)")
  parser.add_argument("--no-llama7b", action="store_true")
  parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
  parser.add_argument("--step-worker", nargs=3, help=argparse.SUPPRESS)
  parser.add_argument("--llama7b-worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    print(json.dumps(_worker(*args.worker, args.repeats)))
  elif args.step_worker:
    kind, n, total = args.step_worker
    print(json.dumps(_step_worker(kind, int(n), int(total))))
  elif args.llama7b_worker:
    print(json.dumps(_llama7b_worker()))
  else:
    structures = args.structures.split(",") if args.structures else QUICK if args.quick else FULL
    steps = [int(n) for n in args.step_leaves.split(",")] if args.step_leaves else (10,) if args.quick else (10, 100, 500)
    report = run(structures, steps, 10**5 if args.quick else 10**6, args.repeats,
                 llama7b=not (args.quick or args.no_llama7b), contenders=args.contenders.split(","))
    print(json.dumps(report))
    print(format_table(report))


if __name__ == "__main__":
  main()
