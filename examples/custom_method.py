"""Example 5: your own pruning method in a few lines, with torch's iterative semantics for free.

A method is one pure function ``compute_mask(t, default_mask, **kwargs) -> mask``, as in torch's
``BasePruningMethod``; :func:`jaxprune.pruning_method` gives it the built-ins' calling convention (``mask=``
to continue an earlier pruning, ``importance_scores=``), torch's ``PruningContainer`` combination (a second call
sees only the entries still alive; pruned entries never come back), and it works with :func:`jaxprune.prune` on
whole pytrees and under ``jit``.

Two methods:

* ``every_other``: the PyTorch pruning tutorial's ``FooBarPruningMethod``, applied twice to LeNet's ``fc3.bias``
  as in the tutorial, and compared with torch running the tutorial's own class (identical masks);
* ``below_std``: Han et al.'s (2015) threshold, prune the weights whose magnitude is below ``quality`` times the
  standard deviation of the layer's surviving weights, applied to every LeNet weight at once, jitted.

Run: ``python examples/custom_method.py`` (it is quick; ``--short`` is accepted for symmetry with the others).
"""
from __future__ import annotations

from typing import Optional, Sequence

import common  # examples/common.py; also puts the repository root on sys.path
import jax
import jax.numpy as jnp
import numpy as np

import jaxprune
from interop import flax_models


@jaxprune.pruning_method("unstructured")
def every_other(t, default_mask):
  """Prunes every other entry still alive (``t`` holds the live entries first, in order)."""
  return default_mask.at[::2].set(False)


@jaxprune.pruning_method("unstructured")
def below_std(t, default_mask, quality=1.0):
  """Prunes the live entries with ``|w| < quality * std(live w)`` (Han et al. 2015's threshold)."""
  live = default_mask.astype(t.dtype)
  mean = jnp.sum(t * live) / jnp.sum(live)
  std = jnp.sqrt(jnp.sum(live * (t - mean) ** 2) / jnp.sum(live))
  return default_mask & (jnp.abs(t) >= quality * std)


def torch_every_other_twice(bias: np.ndarray) -> Optional[np.ndarray]:
  """The tutorial's FooBarPruningMethod run twice by torch itself; None without torch."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from torch.nn.utils import prune  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None

  class FooBarPruningMethod(prune.BasePruningMethod):  # verbatim from the PyTorch pruning tutorial
    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
      mask = default_mask.clone()
      mask.view(-1)[::2] = 0
      return mask

  module = torch.nn.Linear(1, bias.size)
  with torch.no_grad():
    module.bias.copy_(torch.from_numpy(np.array(bias)))
  for _ in range(2):
    FooBarPruningMethod.apply(module, "bias")
  return module.bias_mask.numpy() != 0


def main(argv: Optional[Sequence[str]] = None) -> dict:
  p = common.ExampleParser(__doc__.splitlines()[0], "same as the full run (it takes seconds)")
  p.add_argument("--quality", type=float, default=0.75, help="below_std's threshold, in standard deviations")
  args = p.parse_args(argv)

  init = common.initializer(flax_models.LeNet(), np.zeros((1, 32, 32, 1), np.float32))
  params = init(jax.random.key(args.seed))["params"]

  # 1. every_other on fc3's bias, twice: the second call prunes every other *remaining* entry.
  bias = params["fc3"]["bias"]
  first = every_other(bias)
  second = every_other(bias, mask=first)
  torch_mask = torch_every_other_twice(np.asarray(bias))
  common.console.print(f"every_other on fc3.bias: after one call {first.astype(int).tolist()}, "
                       f"after two {second.astype(int).tolist()}")
  if torch_mask is None:
    common.console.print("torch is not installed: skipped the comparison with the tutorial's FooBarPruningMethod")
  else:
    common.console.print(f"torch's FooBarPruningMethod, applied twice: {torch_mask.astype(int).tolist()} "
                         f"(identical: {bool(np.array_equal(second, torch_mask))})")

  # 2. below_std on every weight of the model, jitted, twice (the threshold moves as the survivors change).
  prune_all = jax.jit(lambda params, masks: jaxprune.prune(params, below_std, masks=masks, quality=args.quality))
  masks = prune_all(params, jaxprune.init_masks(params))
  masks = prune_all(params, masks)
  report = jaxprune.sparsity_report(params, masks)
  common.console.print(f"below_std(quality={args.quality}) applied twice to every LeNet weight, under jit:")
  common.console.print(str(report))
  return {"every_other": (np.asarray(first), np.asarray(second)),
          "torch_every_other": torch_mask, "params": params, "below_std_masks": masks,
          "sparsity": report.masked_sparsity, "quality": args.quality}


if __name__ == "__main__":
  main()
