"""Example 1: prune the PyTorch tutorial's LeNet to 95%+ sparsity on real handwritten digits, then run it in torch.

Han et al. (2015), "Learning both weights and connections for efficient neural networks": train the dense
network, then repeat { prune the smallest-magnitude weights of the whole network (one global L1 ranking), fine-tune
the survivors }. Each round removes ``--amount`` of the weights still alive, so the sparsity compounds:
1 - (1 - 0.4)^6 = 95.3% after six rounds.

Fine-tuning uses :func:`jaxprune.masked_optimizer` around Adam: pruned weights are exactly 0.0 after every step
and Adam's moments never revive them (zeroing the gradients alone would not do: Adam's momentum from the dense
phase keeps moving them, see the README's "why momentum matters").

The data is scikit-learn's 1,797 8x8 digit scans (shipped with scikit-learn, no download), scaled to LeNet's
32x32 input. At the end the pruned model is written as a torch checkpoint (``conv1.weight_orig`` +
``conv1.weight_mask``, ... exactly what ``torch.nn.utils.prune`` saves), loaded into a fresh torch LeNet with
:func:`interop.load_pruned`, and torch's predictions on the test set are compared with JAX's.

Run: ``python examples/lenet_digits.py`` (about a minute on a 2-core CPU; ``--short`` for the CI smoke run).
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional, Sequence

import common  # examples/common.py; also puts the repository root on sys.path
import jax
import numpy as np
import optax
from rich.table import Table

import interop
import jaxprune
from interop import flax_models


class Round(NamedTuple):
  """One row of the results: ``pruned_accuracy`` is measured right after pruning, before fine-tuning."""
  round: int
  live: int
  sparsity: float
  pruned_accuracy: Optional[float]
  accuracy: float


def results_table(rows: Sequence[Round], total: int) -> Table:
  table = Table(title=f"LeNet on digits: global L1 pruning of {total:,} weights, fine-tuned after each round")
  for name in ("round", "weights left", "sparsity", "acc. after prune", "acc. after fine-tune"):
    table.add_column(name, justify="right")
  for r in rows:
    table.add_row("dense" if r.round == 0 else str(r.round), f"{r.live:,}", f"{r.sparsity:.2%}",
                  "-" if r.pruned_accuracy is None else f"{r.pruned_accuracy:.2%}", f"{r.accuracy:.2%}")
  return table


def save_plot(rows: Sequence[Round], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")  # no display needed
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  sparsity = [100 * r.sparsity for r in rows]
  fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
  ax.plot(sparsity, [100 * r.accuracy for r in rows], "o-", label="after fine-tuning")
  ax.plot(sparsity[1:], [100 * r.pruned_accuracy for r in rows[1:]], "x--", label="right after pruning")
  ax.set_xlabel("sparsity of the weights (%)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("LeNet on scikit-learn digits: iterative global L1 pruning")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower left")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def torch_check(params, masks, x_test: np.ndarray, jax_logits: np.ndarray, path: str) -> dict:
  """Writes a torch checkpoint, loads it into a fresh torch LeNet and compares its predictions with JAX's."""
  from interop import models  # pylint: disable=import-outside-toplevel  # needs torch
  state_dict = interop.to_torch(params, masks, layout="flax", module=models.LeNet())
  interop.save_state_dict(state_dict, path)
  torch_model = interop.load_pruned(models.LeNet(), path)
  logits = common.torch_logits(torch_model, x_test)
  same = np.argmax(logits, -1) == np.argmax(jax_logits, -1)
  return {"checkpoint": path, "keys": list(state_dict), "predictions_identical": bool(same.all()),
          "agreement": float(same.mean()), "max_logit_diff": float(np.abs(logits - jax_logits).max())}


def main(argv: Optional[Sequence[str]] = None) -> dict:
  p = common.ExampleParser(__doc__.splitlines()[0], "CI smoke run: fewer epochs, 3 bigger rounds")
  p.add_argument("--out", default="out", help="folder for the plot and the torch checkpoint")
  p.add_mode_argument("--rounds", type=int, full=6, short=3, help="prune/fine-tune rounds")
  p.add_mode_argument("--amount", type=float, full=0.4, short=0.64,
                      help="fraction of the live weights pruned per round")
  p.add_mode_argument("--epochs", type=int, full=20, short=3, help="dense training epochs")
  p.add_mode_argument("--finetune-epochs", type=int, full=5, short=1, help="fine-tuning epochs per round")
  p.add_argument("--no-torch", action="store_true", help="skip the torch export and check")
  args = p.parse_args(argv)
  rounds, amount, epochs, finetune = args.rounds, args.amount, args.epochs, args.finetune_epochs
  os.makedirs(args.out, exist_ok=True)

  data = common.load_digits(seed=args.seed)
  model = flax_models.LeNet()
  params = common.initializer(model, data.x_train)(jax.random.key(args.seed))["params"]
  masks = jaxprune.init_masks(params)  # every conv and dense kernel takes part; biases are left alone
  total = sum(m.size for m in jax.tree.leaves(masks) if jaxprune.is_masked(m))
  optimizer = jaxprune.masked_optimizer(optax.adam(1e-3), masks)
  state = common.TrainState(params, {}, optimizer.init(params))
  train = common.make_train(model, optimizer, data.x_train, data.y_train)
  predict = common.make_predict(model)
  rng = np.random.default_rng(args.seed)

  def test_accuracy(params, masks) -> float:
    return common.accuracy(predict(jaxprune.apply_masks(params, masks), {}, data.x_test), data.y_test)

  def live(masks) -> int:
    return int(sum(np.count_nonzero(m) for m in jax.tree.leaves(masks) if jaxprune.is_masked(m)))

  rows = []
  n = len(data.y_train)
  with common.progress(epochs + rounds * finetune, "dense") as advance:
    # The masks go in at every step: they are traced arrays, so one compiled loop serves every round.
    state = common.fit(train, state, rng, n, epochs, advance, masks=masks)
    rows.append(Round(0, total, 0.0, None, test_accuracy(state.params, masks)))
    for r in range(1, rounds + 1):
      masks = jaxprune.global_unstructured(state.params, amount, masks=masks)
      pruned_accuracy = test_accuracy(state.params, masks)
      step = functools.partial(advance, description=f"round {r}/{rounds}")
      state = common.fit(train, state, rng, n, finetune, step, masks=masks)
      rows.append(Round(r, live(masks), 1 - live(masks) / total, pruned_accuracy, test_accuracy(state.params, masks)))

  common.console.print(results_table(rows, total))
  plot = os.path.join(args.out, "lenet_digits.png")
  save_plot(rows, plot)
  # Lock semantics keep pruned params at exactly 0.0, so the params need no masking to be the pruned model.
  zeros_held = all(bool(np.all(np.asarray(p)[~np.asarray(m)] == 0))
                   for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(masks)) if jaxprune.is_masked(m))
  result = {"rows": [r._asdict() for r in rows], "sparsity": rows[-1].sparsity, "accuracy": rows[-1].accuracy,
            "dense_accuracy": rows[0].accuracy, "pruned_weights_exactly_zero": zeros_held, "plot": plot}
  common.console.print(f"Pruned weights exactly 0.0 after fine-tuning: {zeros_held}. Plot: {plot}")
  if not args.no_torch:
    jax_logits = np.asarray(predict(state.params, {}, data.x_test))
    check = torch_check(state.params, masks, data.x_test, jax_logits, os.path.join(args.out, "lenet_digits.pt"))
    result["torch"] = check
    common.console.print(
        f"torch: {check['checkpoint']} ({len(check['keys'])} keys, e.g. "
        f"{next(k for k in check['keys'] if k.endswith('_orig'))}) loaded into a fresh "
        f"torch LeNet with interop.load_pruned: predictions identical on all {len(data.y_test)} test digits: "
        f"{check['predictions_identical']} (max |logit difference| {check['max_logit_diff']:.1e}). "
        f"Try: jaxprune inspect {check['checkpoint']}")
  return result


if __name__ == "__main__":
  main()
