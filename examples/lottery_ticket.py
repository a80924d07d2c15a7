"""Example 4: the lottery ticket hypothesis (Frankle & Carbin 2019) on LeNet and digits: rewinding vs re-init.

Iterative magnitude pruning with rewinding: train, prune ``--amount`` of the surviving weights (global L1), reset
the survivors to their *initial* values, train again, repeat. The claim is that the sparse sub-network found this
way (the "winning ticket": the mask plus those initial values) trains as well as the dense network, while the same
mask with a fresh random initialisation does worse, more so as the sparsity grows.

:func:`jaxprune.scheduled_pruning` does the whole procedure inside the optimizer: an iterative schedule prunes at
the start of every round and ``rewind_step=0`` resets the params to the initial ones right after. The control
trains the same masks from a new random initialisation with :func:`jaxprune.masked_optimizer`.

Run: ``python examples/lottery_ticket.py`` (``--short`` for the CI smoke run).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import common  # examples/common.py; also puts the repository root on sys.path
import jax
import numpy as np
import optax
from rich.table import Table

import jaxprune
from jaxprune import schedules
from interop import flax_models


def main(argv: Optional[Sequence[str]] = None) -> dict:
  p = common.ExampleParser(__doc__.splitlines()[0], "CI smoke run: 2 rounds of 1 epoch")
  p.add_mode_argument("--rounds", type=int, full=5, short=2, help="pruning rounds")
  p.add_argument("--amount", type=float, default=0.5, help="fraction of the surviving weights pruned per round")
  p.add_mode_argument("--epochs", type=int, full=4, short=1, help="training epochs per round")
  args = p.parse_args(argv)
  rounds, epochs = args.rounds, args.epochs

  data = common.load_digits(seed=args.seed)
  n = len(data.y_train)
  model = flax_models.LeNet()
  init_key, reinit_key = jax.random.split(jax.random.key(args.seed))
  init = common.initializer(model, data.x_train)
  params = init(init_key)["params"]
  every = epochs * (n // common.BATCH_SIZE)  # steps per round
  schedule = schedules.iterative(args.amount, every, begin=every, rounds=rounds)
  ticket_opt = jaxprune.scheduled_pruning(optax.adam(1e-3), schedule, "global_unstructured", rewind_step=0)
  # The control: fixed masks, given at every step (traced, so one compilation serves all rounds).
  control_opt = jaxprune.masked_optimizer(optax.adam(1e-3), jaxprune.init_masks(params))
  train_ticket = common.make_train(model, ticket_opt, data.x_train, data.y_train)
  train_control = common.make_train(model, control_opt, data.x_train, data.y_train)
  predict = common.make_predict(model)
  rng = np.random.default_rng(args.seed)

  def test_accuracy(params) -> float:
    return common.accuracy(predict(params, {}, data.x_test), data.y_test)

  state = common.TrainState(params, {}, ticket_opt.init(params))
  rows = []
  with common.progress((1 + 2 * rounds) * epochs, "dense") as advance:
    state = common.fit(train_ticket, state, rng, n, epochs, advance)
    rows.append({"round": 0, "sparsity": 0.0, "ticket": test_accuracy(state.params), "random_init": None})
    for r in range(1, rounds + 1):
      # The round's first update prunes and rewinds; the rest of the round trains the ticket.
      state = common.fit(train_ticket, state, rng, n, epochs,
                         functools.partial(advance, description=f"round {r}: ticket"))
      masks = jaxprune.masks_from_state(state.opt_state)
      fresh = jaxprune.apply_masks(init(jax.random.fold_in(reinit_key, r))["params"], masks)
      control = common.TrainState(fresh, {}, control_opt.init(fresh))
      control = common.fit(train_control, control, rng, n, epochs,
                           functools.partial(advance, description=f"round {r}: random init"), masks=masks)
      report = jaxprune.sparsity_report(state.params, masks)
      rows.append({"round": r, "sparsity": report.masked_sparsity, "ticket": test_accuracy(state.params),
                   "random_init": test_accuracy(control.params)})

  table = Table(title=f"Lottery tickets: global L1, {args.amount:.0%} of the survivors per round, {epochs} epochs "
                      "per round")
  for name in ("round", "sparsity", "ticket (rewound to init)", "same mask, random init"):
    table.add_column(name, justify="right")
  for row in rows:
    table.add_row(str(row["round"]) if row["round"] else "dense", f"{row['sparsity']:.2%}", f"{row['ticket']:.2%}",
                  "-" if row["random_init"] is None else f"{row['random_init']:.2%}")
  common.console.print(table)
  gaps = [row["ticket"] - row["random_init"] for row in rows[1:]]
  common.console.print(f"Ticket minus random init, per round: {', '.join(f'{g:+.2%}' for g in gaps)}")
  return {"rows": rows, "sparsity": rows[-1]["sparsity"], "ticket_accuracy": rows[-1]["ticket"],
          "random_init_accuracy": rows[-1]["random_init"], "dense_accuracy": rows[0]["ticket"]}


if __name__ == "__main__":
  main()
