"""torch filter semantics: a torch.nn.utils.prune fine-tuning loop reproduced with jaxprune + optax (spec §10).

In torch the optimizer holds ``weight_orig`` (spec §1.2 step 6) and the forward uses ``weight_orig * weight_mask``
(spec §1.3), so the gradient is masked by the chain rule but coupled weight decay and momentum built up before
pruning still move pruned ``weight_orig`` entries (spec §10) while the effective weight stays 0. Same init, same
batches: ``weight_orig``, masks and effective weights must match after 25 steps.

Optimizer correspondences (torch formulas): SGD ``d_p = g + wd*p; buf = mu*buf + d_p (buf_0 = d_p); p -= lr*buf``
is ``chain(add_decayed_weights(wd), sgd(lr, momentum=mu))``; Adam's L2 ``weight_decay`` is
``add_decayed_weights`` before ``adam``; AdamW is ``optax.adamw``.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.utils.prune as tprune

import jaxprune
from jaxprune import schedules
from jaxprune.optim import masked_optimizer, masks_from_state
from jaxprune.optim_pruning import scheduled_pruning

STEPS = 25
LAYERS = ("0", "2")
rng = np.random.default_rng(0)
BATCHES = [(rng.normal(size=(32, 6)).astype(np.float32), rng.normal(size=(32, 3)).astype(np.float32))
           for _ in range(STEPS)]

OPTIMIZERS = {  # name: (torch optimizer factory, optax optimizer)
    "sgd_momentum_wd": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
                        optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.05, momentum=0.9))),
    "sgd_nesterov_wd": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
                        optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.05, momentum=0.9, nesterov=True))),
    "adam": (lambda p: torch.optim.Adam(p, lr=1e-2), optax.adam(1e-2, b1=0.9, b2=0.999, eps=1e-8)),
    "adam_l2": (lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1),
                optax.chain(optax.add_decayed_weights(0.1), optax.adam(1e-2))),
    "adamw": (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), optax.adamw(1e-2, weight_decay=0.1)),
}


def torch_net():
  torch.manual_seed(0)
  return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def as_jax(net):
  """Params in torch's layout (weight is (out, in)), named like the state_dict; pruned weights give weight_orig."""
  sd = net.state_dict()
  def get(layer, name):
    return jnp.asarray(sd.get(f"{layer}.{name}_orig", sd.get(f"{layer}.{name}")).numpy())
  return {layer: {"weight": get(layer, "weight"), "bias": get(layer, "bias")} for layer in LAYERS}


def torch_masks(net):
  return {layer: np.asarray(getattr(net[int(layer)], "weight_mask").numpy() != 0) for layer in LAYERS}


def loss_fn(params, masks, x, y):
  w = jaxprune.apply_masks(params, masks)
  h = jnp.tanh(x @ w["0"]["weight"].T + w["0"]["bias"])
  return jnp.mean((h @ w["2"]["weight"].T + w["2"]["bias"] - y) ** 2)


def torch_step(net, opt, x, y, prune=lambda: None):
  opt.zero_grad()
  torch.nn.functional.mse_loss(net(torch.tensor(x)), torch.tensor(y)).backward()
  prune()
  opt.step()


def assert_match(net, params, masks):
  net(torch.tensor(BATCHES[0][0]))  # refresh the stale effective weight (spec §5.5) before reading it
  theirs = as_jax(net)
  for layer in LAYERS:
    np.testing.assert_array_equal(np.asarray(masks[layer]["weight"]), torch_masks(net)[layer])
    for name in ("weight", "bias"):
      np.testing.assert_allclose(params[layer][name], theirs[layer][name], rtol=0, atol=1e-5,
                                 err_msg=f"{layer}.{name}_orig")
    effective = jaxprune.apply_masks(params, masks)[layer]["weight"]
    np.testing.assert_allclose(effective, net[int(layer)].weight.detach().numpy(), rtol=0, atol=1e-5)
    assert np.all(np.asarray(effective)[~torch_masks(net)[layer]] == 0.0)


@jax.jit
def l1_prune_half(params):
  return jaxprune.prune(params, "l1_unstructured", amount=0.5)


@functools.partial(jax.jit, static_argnums=0)
def jax_step(opt, params, state, masks, x, y):
  updates, state = opt.update(jax.grad(loss_fn)(params, masks, x, y), state, params, masks=masks)
  return optax.apply_updates(params, updates), state


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fine_tuning_after_pruning_matches_torch(name):
  """Warm up 3 steps dense (so momentum/Adam state exists), L1-prune half of each weight, fine-tune 22 steps."""
  make_torch_opt, inner = OPTIMIZERS[name]
  net = torch_net()
  params = as_jax(net)
  torch_opt = make_torch_opt(net.parameters())
  opt = masked_optimizer(inner, semantics="torch")
  state = opt.init(params)
  masks = jaxprune.init_masks(params)
  for t, (x, y) in enumerate(BATCHES):
    if t == 3:
      for layer in LAYERS:
        tprune.l1_unstructured(net[int(layer)], "weight", amount=0.5)
      masks = l1_prune_half(params)
      at_pruning = params
    torch_step(net, torch_opt, x, y)
    params, state = jax_step(opt, params, state, masks, x, y)
  assert_match(net, params, masks)
  # The scenario exercises filter semantics: the optimizer moved pruned weight_orig entries (spec §10).
  pruned = ~np.asarray(masks["0"]["weight"])
  assert np.abs(np.asarray(params["0"]["weight"] - at_pruning["0"]["weight"])[pruned]).max() > 1e-6


@pytest.mark.parametrize("method", ["l1_unstructured", "global_unstructured"])
def test_scheduled_pruning_in_torch_semantics_matches_torch(method):
  """Two pruning rounds inside the optax update (iterative schedule, 0.5 of the rest each) against torch pruning
  between ``backward()`` and ``step()`` of steps 3 and 10. Both rank the weights this step's forward used: the
  parameter itself on torch's first prune, the effective weight of this forward later (spec §5.5, §6), and the
  gradient, computed before pruning, is applied unmasked to the newly pruned ``weight_orig`` entries."""
  make_torch_opt, inner = OPTIMIZERS["sgd_momentum_wd"]
  net = torch_net()
  params = as_jax(net)
  torch_opt = make_torch_opt(net.parameters())
  opt = scheduled_pruning(inner, schedules.iterative(0.5, every=7, begin=3, rounds=2), method, semantics="torch")
  state = opt.init(params)

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, masks_from_state(state), x, y)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def torch_prune():
    if method == "global_unstructured":
      tprune.global_unstructured([(net[int(layer)], "weight") for layer in LAYERS],
                                 pruning_method=tprune.L1Unstructured, amount=0.5)
    else:
      for layer in LAYERS:
        tprune.l1_unstructured(net[int(layer)], "weight", amount=0.5)

  for t, (x, y) in enumerate(BATCHES):
    torch_step(net, torch_opt, x, y, torch_prune if t in (3, 10) else lambda: None)
    params, state = step(params, state, x, y)
  assert_match(net, params, masks_from_state(state))
