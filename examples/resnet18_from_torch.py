"""Example 2: a ResNet-18 pruned in torch, fine-tuned in JAX, and handed back to torch.

The lab scenario: a torch ResNet-18 was pruned with ``torch.nn.utils.prune`` (here a global L1 prune of every
convolution and the classifier) and saved as usual, ``conv1.weight_orig`` + ``conv1.weight_mask`` and BatchNorm
statistics. This example

1. converts the checkpoint to Flax with :func:`interop.from_torch` (kernels transposed, masks as bool, running
   statistics into ``batch_stats``) and checks the Flax model computes what the torch model computes;
2. fine-tunes it in JAX with :func:`jaxprune.masked_optimizer` around AdamW, whose weight decay and momentum would
   move pruned weights in a torch fine-tuning loop (the README's "why momentum matters"); here every pruned weight
   is checked to be exactly 0.0 after every step, inside the compiled loop;
3. converts back with :func:`interop.to_torch`, loads the result into a fresh torch ResNet-18 with
   :func:`interop.load_pruned`, and compares torch's outputs with JAX's. The masks are torch's own, unchanged.

A randomly initialised ResNet-18 stands in for the lab's trained one (no download); the fine-tuning data is
scikit-learn's digits, upscaled to 32x32 and repeated over 3 channels.

Run: ``python examples/resnet18_from_torch.py`` (``--short`` for the CI smoke run).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import common  # examples/common.py; also puts the repository root on sys.path
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from torch import nn
from torch.nn.utils import prune

import interop
import jaxprune
from interop import flax_models, models


def prune_in_torch(amount: float, seed: int) -> nn.Module:
  """What the lab did: a global L1 prune of every conv and linear weight, with torch.nn.utils.prune."""
  torch.manual_seed(seed)
  net = models.ResNet18(num_classes=10)
  targets = [(m, "weight") for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
  prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
  return net


def max_abs_pruned(params, masks) -> jax.Array:
  """The largest magnitude among pruned params (0.0 iff every pruned weight is exactly zero)."""
  return jnp.max(jnp.stack([jnp.max(jnp.where(m, 0.0, jnp.abs(p))) for p, m in
                            zip(jax.tree.leaves(params), jax.tree.leaves(masks)) if jaxprune.is_masked(m)]))


def main(argv: Optional[Sequence[str]] = None) -> dict:
  p = common.ExampleParser(__doc__.splitlines()[0], "CI smoke run: 2 steps of 8 images, 32 test images compared")
  p.add_argument("--out", default="out", help="folder for the torch checkpoints")
  p.add_argument("--amount", type=float, default=0.6, help="torch's global L1 pruning amount")
  p.add_mode_argument("--steps", type=int, full=30, short=2, help="fine-tuning steps")
  p.add_mode_argument("--batch-size", type=int, full=32, short=8, help="fine-tuning batch size")
  args = p.parse_args(argv)
  steps, batch_size = args.steps, args.batch_size
  os.makedirs(args.out, exist_ok=True)
  data = common.load_digits(seed=args.seed, channels=3)
  x_check = data.x_test[:32] if args.short else data.x_test

  # 0. The lab's checkpoint.
  torch_net = prune_in_torch(args.amount, args.seed)
  torch_path = os.path.join(args.out, "resnet18_torch_pruned.pt")
  torch.save(torch_net.state_dict(), torch_path)
  before = common.torch_logits(torch_net, x_check)

  # 1. torch -> Flax.
  converted = interop.from_torch(torch_path, layout="flax")
  masks = converted.masks
  params = jaxprune.apply_masks(converted.params, masks)  # lock semantics: pruned weights hold exactly 0.0
  extra = {"batch_stats": converted.buffers["batch_stats"]}
  model = flax_models.ResNet18(num_classes=10)
  predict = common.make_predict(model)
  converted_diff = float(np.abs(np.asarray(predict(params, extra, x_check)) - before).max())
  report = jaxprune.sparsity_report(params, masks)
  common.console.print(f"Converted {torch_path}: {sum(leaf.masked for leaf in report.leaves)} pruned tensors, "
                       f"sparsity {report.masked_sparsity:.2%} of their weights; Flax vs torch logits before "
                       f"fine-tuning: max |difference| {converted_diff:.1e}")

  # 2. Fine-tune in JAX; the largest pruned magnitude is recorded after every step, inside the compiled loop.
  optimizer = jaxprune.masked_optimizer(optax.adamw(1e-3, weight_decay=5e-4), masks)
  train = common.make_train(model, optimizer, data.x_train, data.y_train,
                            observe=lambda s: {"max_abs_pruned": max_abs_pruned(s.params, masks)})
  state = common.TrainState(params, extra, optimizer.init(params))
  indices = common.epoch_indices(np.random.default_rng(args.seed), len(data.y_train), batch_size,
                                 epochs=-(-steps * batch_size // len(data.y_train)))[:steps]
  with common.console.status(f"fine-tuning {steps} steps of {batch_size} images (one jitted loop)"):
    state, metrics = train(state, indices)
    drift = np.asarray(metrics["max_abs_pruned"])
  losses = np.asarray(metrics["loss"])
  stayed_zero = bool(np.all(drift == 0.0))
  common.console.print(f"Fine-tuned with masked AdamW (weight decay 5e-4): loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
                       f"largest |pruned weight| after each of the {steps} steps: {drift.max()} "
                       f"(exactly zero throughout: {stayed_zero})")

  # 3. JAX -> torch, into a fresh model.
  buffers = {**converted.buffers, "batch_stats": state.extra["batch_stats"]}
  state_dict = interop.to_torch(state.params, masks, buffers, converted.spec)
  back_path = os.path.join(args.out, "resnet18_finetuned_in_jax.pt")
  interop.save_state_dict(state_dict, back_path)
  fresh = interop.load_pruned(models.ResNet18(num_classes=10), back_path)
  jax_logits = np.asarray(predict(state.params, state.extra, x_check))
  torch_logits = common.torch_logits(fresh, x_check)
  same_predictions = bool(np.array_equal(jax_logits.argmax(-1), torch_logits.argmax(-1)))
  masks_kept = all(torch.equal(getattr(fresh.get_submodule(key[:-len(".weight_mask")]), "weight_mask"),
                               torch_net.state_dict()[key]) for key in torch_net.state_dict() if key.endswith("_mask"))
  state_dict_exact = interop.diff_state_dicts(fresh.state_dict(), state_dict) == []
  logit_diff = float(np.abs(jax_logits - torch_logits).max())
  accuracy = common.accuracy(torch_logits, data.y_test[:len(x_check)])
  common.console.print(
      f"Back in torch ({back_path}): the fresh model's state_dict equals the converted one bit for bit: "
      f"{state_dict_exact}; torch's masks unchanged: {masks_kept}; predictions identical on {len(x_check)} test "
      f"images: {same_predictions} (max |logit difference| {logit_diff:.1e}, float32 rounding of different conv "
      f"kernels); torch's test accuracy {accuracy:.2%}")
  return {"sparsity": report.masked_sparsity, "converted_logit_diff": converted_diff, "losses": losses.tolist(),
          "accuracy": accuracy,
          "pruned_stayed_zero": stayed_zero, "max_abs_pruned": float(drift.max()),
          "state_dict_exact": state_dict_exact, "masks_kept": masks_kept, "predictions_identical": same_predictions,
          "logit_diff": logit_diff, "checkpoints": (torch_path, back_path)}


if __name__ == "__main__":
  main()
