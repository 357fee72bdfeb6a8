"""The contract between the training loop and an optimizer: what one optimizer step may do.

The loop (``train.run``) owns the data, the method and the accelerator; the optimizer owns *how
often and at which weights* the method's objective is evaluated. They meet in a ``StepClosure``
(ALGORITHMS.md §3). Three kinds of step exist, chosen per step by the optimizer:

* **first order, one evaluation** (adamw, sgd, signsgd, signadam, nbit): the loop calls the
  closure once with gradients enabled, clips ``.grad`` once, then calls ``optimizer.step()``
  through accelerate's wrapper, so fp16 loss scaling and sharded wrappers work as for AdamW.
* **first order, several evaluations** (fo_rs: gradients averaged over weight perturbations;
  sophia: a curvature refresh before the gradient): the optimizer defines
  ``gradient(closure)``, which leaves in ``.grad`` the gradient the update will use; the loop then
  clips once and steps through the wrapper exactly as above. The closure is *never* handed to
  accelerate's wrapper: DeepSpeed's drops it, and fp16 loss scaling would step before it ran.
* **zeroth order** (zo_sgd, zo_adam, zo_radazo, and the ZO phases of fo_zo): the optimizer says
  ``is_zeroth_order_step(step)``; the loop calls the raw optimizer's ``step(closure)`` under
  ``torch.no_grad`` and the optimizer evaluates the closure at perturbed weights and updates the
  weights itself. No ``.grad`` is written and no graph is built.

Every closure call's loss and statistics are recorded; the step logs their mean (so a ZO step logs
the mean of L(θ+μu) and L(θ−μu), the loss at θ to O(μ²), not its last perturbed evaluation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass(frozen=True)
class BuildContext:
    """What an optimizer factory may need besides its parameters and hyperparameters.

    Attributes:
        model: the (unwrapped) model whose trainable parameters are optimised; perturbation-based
            optimizers hook its modules to apply θ + c·u at use instead of writing into θ.
        seed: the run's seed; random directions and perturbations are drawn from
            ``(seed, step, index)`` generators, so every data-parallel process draws the same ones.
        all_reduce_mean: mean of a tensor over data-parallel processes (identity on one process);
            ZO optimizers average their projected differences with it, so replicas never drift.
        total_steps: optimizer steps the run will take (a hybrid schedule ends on a ZO phase);
            None when unknown.
    """

    model: torch.nn.Module
    seed: int = 0
    all_reduce_mean: Callable[[Tensor], Tensor] = lambda t: t
    total_steps: int | None = None


@runtime_checkable
class StepClosure(Protocol):
    """The method's objective on this step's batch, as the loop hands it to an optimizer.

    ``closure()`` evaluates the objective over all the step's micro-batches at the *current*
    weights and returns the (detached) scalar. With gradients enabled it first sets every trainable
    ``.grad`` to None and then runs backward, so afterwards ``.grad`` holds the gradient of that one
    evaluation: calling it twice gives the gradient of the second call, not the sum. Under
    ``torch.no_grad`` it only evaluates. It never clips (the loop clips once per step).
    """

    step: int  # 0-based optimizer step

    def __call__(self) -> Tensor: ...

    def sampled_backward(self) -> int:
        """Gauss-Newton-Bartlett probe (Sophia): zero ``.grad``, then backward of the mean token
        cross-entropy of the step's inputs against labels *sampled from the model's own
        predictive distribution* at the scored (answer) positions. Returns the number of tokens
        the mean ran over (the estimator's batch size B)."""
        ...

    def report(self, **stats: float) -> None:
        """Add statistics to the step's logged row (e.g. ``grad_norm`` of a ZO estimate)."""
        ...


class GradientBuilder(Protocol):
    """Optional: a first-order optimizer whose gradient takes more than one closure call."""

    def gradient(self, closure: StepClosure) -> None:
        """Leave in ``.grad`` the gradient the next ``step()`` uses (unclipped)."""
        ...


class ZerothOrderSteps(Protocol):
    """Optional: an optimizer with gradient-free steps (``step(closure)`` under ``no_grad``)."""

    def is_zeroth_order_step(self, step: int) -> bool: ...


def is_zeroth_order_step(optimizer: torch.optim.Optimizer, step: int) -> bool:
    """Whether ``optimizer`` (raw, not accelerate's wrapper) takes step ``step`` without gradients."""
    probe = getattr(optimizer, "is_zeroth_order_step", None)
    return bool(probe(step)) if probe is not None else False


def build_gradient(optimizer: torch.optim.Optimizer, closure: StepClosure) -> None:
    """Leave the step's gradient in ``.grad``: the optimizer's ``gradient`` or one closure call."""
    builder = getattr(optimizer, "gradient", None)
    if builder is not None:
        builder(closure)
    else:
        closure()
