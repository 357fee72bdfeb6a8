"""OFMU: bi-level unlearning with a gradient-similarity penalty (ALGORITHMS.md §2 "bilevel").

Asif & Amiri 2025, "OFMU: Optimization-Driven Framework for Machine Unlearning", arXiv:2509.22483.
Inner problem: maximise forgetting while decorrelating the forget and retain gradients,

    Φ(θ) = L_f(θ) − β·sim(∇L_f(θ), ∇L_r(θ)),   T ascent steps θ' ← θ' + η_in·∇Φ(θ'),

outer problem (penalty form): min L_r(θ) + ρ·‖∇Φ(θ)‖², one optimizer step per round on the
direction ∇L_r(θ') + 2ρ·∇²Φ(θ')·∇Φ(θ'), with ρ ← min(ρ_max, κ·ρ) after every round. ∇sim needs
Hessian-vector products (``hvp.py``). Where the public record is silent, the **[choice]** made is
a parameter (see ``OFMUArgs``).

The method owns its step (``owns_backward``): the loop's closure calls ``compute_gradients``, which
runs the inner loop, leaves the outer direction in ``.grad`` and, with ``outer_from: inner``, leaves
the parameters at θ' so that the optimizer (AdamW, lr = η_out = the run's lr) steps from there.
Calling the closure twice therefore runs two rounds: only first-order optimizers, which call it
once, fit (``needs_grad`` makes the loop refuse gradient-free ones up front).

Micro-batches: L_f and L_r are the token means over *all* the step's micro-batches (each micro-batch
loss carries the loop's ``token_weight`` and is divided by their number), so gradients, the
similarity and the HVPs are those of the whole accumulated batch, as for every other method. With
``hvp: exact`` the double-backward graphs of all micro-batches are held at once (the memory of one
batch of size grad_accum_steps × batch_size, about 2-3× a plain backward); ``hvp: finite_diff``
streams them one at a time and holds no graph. On top, about 8 parameter-sized vectors (θ, g_f,
g_r, a, b, ∇Φ, the HVP, the direction) are alive at once.

Cost per optimizer step (a GradDiff step is one forward and one backward of the forget and the
retain batch, "2 passes"). A round evaluates ∇Φ at θ_0 … θ_T (T + 1 times) plus the outer product
∇²Φ·∇Φ. One ∇Φ is g_f, g_r and the similarity's curvature H_f·a + H_r·b: with ``hvp: exact`` two
graph-building backwards and a double backward through both graphs (≈ 3-4 GradDiff steps on the
embedded model: the double backward through attention and the vocabulary softmax is dear), with
``hvp: finite_diff`` two more gradients per stream (``fd_scheme: central``) or one (``forward``,
reusing g_f and g_r). The outer product costs two more ∇Φ (``outer_hvp: finite_diff``, central), one
(forward), a third-order backward (``exact``) or one forget gradient / one double backward
(``forget_only``). So a faithful round with T = 1 needs at least 8 passes plus the outer product,
against GradDiff's 2: the issue's goal of ≤ 3× a GradDiff step (the paper: 2.85-4.22× a
gradient-ascent step) is not reachable without dropping terms. Measured (docs/ofmu-step-cost.md,
``make bench-ofmu``, embedded model, × GradDiff): the defaults 10.1×, ``outer_hvp: forget_only``
6.2×, ``hvp: finite_diff`` + ``fd_scheme: forward`` 5.6× at GradDiff's memory (no graph is kept),
both together 3.8×, β = 0 with ``forget_only`` 2.2× (no similarity: not OFMU); an earlier run of the
same bench gave 10.5, 6.0, 5.6, 3.2 and 2.9×. The defaults stay
exact because the finite-difference settings change the trajectory measurably in float32 (forget
prob 0.96 vs 0.91 after the default 30 rounds, seed 0): they are the choice for a large model.

Single process only: the gradients are taken with ``torch.autograd.grad``, which DDP's gradient
all-reduce never sees, so ``setup`` refuses a multi-process run rather than let ranks drift apart.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from unlearnflow.config import Section
from unlearnflow.errors import ConfigError, UnlearnflowError
from unlearnflow.losses import nll_loss, wga_loss
from unlearnflow.methods import hvp as H
from unlearnflow.methods.base import METHODS, Batch, MethodArgs, TrainContext, forward_logits

# L_f, the quantity the inner loop *raises*, per forget micro-batch: f(logits, labels, token_weight).
# nll: the forget NLL (ALGORITHMS.md's definition); wga: the probability-weighted NLL
# mean_t p_t·ℓ_t (= −wga_loss, losses.py, β = 1), which stops pushing tokens already forgotten.
FORGET_OBJECTIVES: dict[str, Callable[..., Tensor]] = {
    "nll": lambda logits, labels, *, token_weight: nll_loss(logits, labels, token_weight=token_weight),
    "wga": lambda logits, labels, *, token_weight: -wga_loss(logits, labels, token_weight=token_weight),
}


class OFMUArgs(MethodArgs):
    """OFMU hyperparameters. T, β, ρ₀, η_in, κ are not published: the defaults are ours [choice].

    Why these defaults, for the embedded model (4 layers, hidden 128, AdamW lr 3e-4, ~15 rounds):
    * ``inner_steps`` 1 (ALGORITHMS.md suggests 5): every inner step costs one full ∇Φ evaluation
      (≈ 3 GradDiff steps), and T = 5 makes a round ≈ 2× dearer than T = 1 (measured: docs). One
      step (the one-step unrolled approximation common in bilevel training) already starts the
      outer step from a point of higher forget loss; over a run the inner ascent steps add up to
      T × rounds, so more epochs buy what a larger T would.
    * ``outer_hvp`` finite_diff: the full ∇²Φ·∇Φ from double backward only (ALGORITHMS.md's first
      option); ``forget_only`` is ≈ 30-40 % cheaper but drops the similarity's curvature.
    * ``inner_lr`` 0.1: the inner update is plain SGD on Φ (no Adam normalisation). The forget
      NLL gradient of a fine-tuned small model has norm ~1–10, so one step moves the weights by
      ~0.1–1 in norm: enough to raise L_f measurably, not enough to wreck the model in one round.
    * ``beta`` 0.1: the cosine lives in [−1, 1] while L_f is a few nats; β = 0.1 keeps the
      decorrelation term a correction to ascent, not its replacement.
    * ``rho_init`` 0.01, ``rho_growth`` 1.1, ``rho_max`` 1.0: the penalty starts small (retain
      descent dominates the outer step) and grows ~10× over 25 rounds; the cap stops it from
      dominating a long run (null = no cap, the paper's schedule).
    """

    forget_loss: Literal["nll", "wga"] = Field("nll", description="L_f raised by the inner loop")
    similarity: H.Similarity = Field(
        "cos",
        description="sim(∇L_f, ∇L_r): cos (the paper; drives the gradients anti-parallel) or cos2 "
        "(cos², decorrelates towards orthogonal) [choice]",
    )
    beta: float = Field(0.1, ge=0, description="weight β of the similarity in Φ")
    inner_steps: int = Field(1, ge=1, description="T, ascent steps on Φ per round")
    inner_lr: float = Field(0.1, gt=0, description="η_in, step of the inner SGD ascent")
    hvp: Literal["exact", "finite_diff"] = Field(
        "exact", description="HVPs of ∇sim: double backward, or central differences of gradients"
    )
    outer_hvp: Literal["finite_diff", "exact", "forget_only"] = Field(
        "finite_diff",
        description="∇²Φ·∇Φ of the penalty: finite_diff (one or two more ∇Φ, see fd_scheme), exact "
        "(third-order backward, needs hvp: exact), forget_only (H_f·∇Φ, drops the similarity's "
        "curvature: a deviation)",
    )
    fd_scheme: Literal["central", "forward"] = Field(
        "central",
        description="finite differences (hvp and outer_hvp finite_diff): central (two gradients, "
        "error O(r²)) or forward (one, reusing the gradient at θ; error O(r))",
    )
    outer_from: Literal["inner", "start"] = Field(
        "inner", description="the optimizer steps from θ' (inner) or from θ with θ''s direction (start)"
    )
    fd_radius: float = Field(1e-3, gt=0, description="r of the finite differences, along the unit direction")
    rho_init: float = Field(0.01, ge=0, description="ρ₀, penalty weight of ‖∇Φ‖²")
    rho_growth: float = Field(1.1, ge=1, description="κ: ρ ← min(ρ_max, κ·ρ) after every round")
    rho_max: float | None = Field(1.0, gt=0, description="cap on ρ; null: no cap (the paper)")

    @model_validator(mode="after")
    def _exact_needs_exact(self) -> OFMUArgs:
        if self.outer_hvp == "exact" and self.hvp != "exact":
            raise ValueError("outer_hvp: exact differentiates the exact ∇Φ; it needs hvp: exact")
        return self


@dataclass
class PhiEval:
    """∇Φ at one point, with what the round logs and the outer step needs (all detached)."""

    forget: float  # L_f
    retain: float  # L_r
    forget_nll: float  # per-token NLL of the forget batch (health checks)
    sim: float
    grad_phi: H.Vec
    grad_retain: H.Vec
    # ∇²Φ·v (outer_hvp exact) or H_f·v (forget_only) from the graphs of this evaluation, if kept.
    outer_hvp: Callable[[H.Vec], H.Vec] | None = None


@contextlib.contextmanager
def _twice_differentiable() -> Iterator[None]:
    # The fused SDPA kernels (flash / memory-efficient, CPU and CUDA) have no double backward:
    # forwards whose graph is differentiated twice must use the plain maths kernel.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


@METHODS.register("ofmu")
class OFMU:
    """OFMU (arXiv:2509.22483): T inner ascent steps on Φ, one outer retain-descent step with ρ‖∇Φ‖²."""

    Args: ClassVar[type[Section]] = OFMUArgs
    needs_grad = True
    owns_backward = True
    streams: tuple[str, ...] = ("forget", "retain")

    def __init__(self, args: Section) -> None:
        assert isinstance(args, OFMUArgs)
        self.args = args
        self.rho: float = args.rho_init
        self.rounds = 0

    def setup(self, model: torch.nn.Module, ctx: TrainContext) -> None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ConfigError("method ofmu runs on one process only (its gradients bypass DDP's all-reduce)")

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        raise UnlearnflowError("ofmu owns its backward: the loop calls compute_gradients, not loss")

    # --- one evaluation of ∇Φ ------------------------------------------------------------------

    def _objectives(
        self, model: torch.nn.Module, micro: Sequence[Batch], stream: str
    ) -> tuple[Tensor, float]:
        """The stream's loss over the step (graph kept) and, for forget, the per-token NLL."""
        total, nll = torch.zeros(()), 0.0
        for mb in micro:
            sub = mb[stream]
            logits = forward_logits(model, sub)
            if stream == "forget":
                value = FORGET_OBJECTIVES[self.args.forget_loss](
                    logits, sub["labels"], token_weight=sub["token_weight"]
                )
                nll += float(nll_loss(logits.detach(), sub["labels"], token_weight=sub["token_weight"]))
            else:
                value = nll_loss(logits, sub["labels"], token_weight=sub["token_weight"])
            total = total + value / len(micro)
        return total, nll / len(micro)

    def _stream_grad(
        self, model: torch.nn.Module, params: Sequence[Tensor], micro: Sequence[Batch], stream: str
    ) -> tuple[float, float, H.Vec]:
        """Loss, forget NLL and gradient of a stream, one micro-batch at a time (no graph kept)."""
        value, nll, acc = 0.0, 0.0, [torch.zeros_like(p) for p in params]
        for mb in micro:
            loss, n = self._objectives(model, [mb], stream)
            for a, g in zip(acc, H.grads(loss / len(micro), params), strict=True):
                a.add_(g)
            value, nll = value + float(loss.detach()) / len(micro), nll + n / len(micro)
        return value, nll, acc

    def _grad_phi(
        self, model: torch.nn.Module, params: Sequence[Tensor], micro: Sequence[Batch], *, outer: bool = False
    ) -> PhiEval:
        """∇Φ = ∇L_f − β·(H_f·a + H_r·b) at the current parameters (``hvp.similarity_terms``).

        With ``outer`` and an exact outer HVP, the graphs are kept and ``PhiEval.outer_hvp`` set.
        """
        a = self.args
        if a.hvp == "finite_diff":
            lf, nll, g_f = self._stream_grad(model, params, micro, "forget")
            lr, _, g_r = self._stream_grad(model, params, micro, "retain")
            sim, ca, cb = H.similarity_terms(g_f, g_r, a.similarity)

            def forget_grad() -> H.Vec:
                return self._stream_grad(model, params, micro, "forget")[2]

            forward = a.fd_scheme == "forward"
            h = [torch.zeros_like(p) for p in params]
            if a.beta > 0:
                hf = H.hvp_finite_diff(
                    forget_grad, params, ca, radius=a.fd_radius, base=g_f if forward else None
                )
                hr = H.hvp_finite_diff(
                    lambda: self._stream_grad(model, params, micro, "retain")[2],
                    params,
                    cb,
                    radius=a.fd_radius,
                    base=g_r if forward else None,
                )
                h = [x + y for x, y in zip(hf, hr, strict=True)]
            ev = PhiEval(lf, lr, nll, sim, [g - a.beta * x for g, x in zip(g_f, h, strict=True)], g_r)
            if outer and a.outer_hvp == "forget_only":
                ev.outer_hvp = lambda v: H.hvp_finite_diff(
                    forget_grad, params, v, radius=a.fd_radius, base=g_f if forward else None
                )
            return ev

        with _twice_differentiable():
            lf_t, nll = self._objectives(model, micro, "forget")
            lr_t, _ = self._objectives(model, micro, "retain")
        g_f = H.grads(lf_t, params, create_graph=True)
        g_r = H.grads(lr_t, params, create_graph=True)
        gf, gr = H.detach(g_f), H.detach(g_r)
        sim, ca, cb = H.similarity_terms(gf, gr, a.similarity)
        ev = PhiEval(float(lf_t.detach()), float(lr_t.detach()), nll, sim, gf, gr)
        if outer and a.outer_hvp == "exact":
            # ∇Φ as a function of θ (autograd of the similarity itself, so a and b are differentiated
            # too), then one more backward: ∇²Φ·v exactly.
            dsim = H.grads(H.similarity(g_f, g_r, a.similarity), params, create_graph=True)
            phi_graph = [f - a.beta * d for f, d in zip(g_f, dsim, strict=True)]
            ev.grad_phi = H.detach(phi_graph)
            ev.outer_hvp = lambda v: H.vjp(phi_graph, params, v)
            return ev
        keep = outer and a.outer_hvp == "forget_only"
        if a.beta > 0:
            # H_f·a + H_r·b in one double backward through both graphs (a, b held constant).
            h = H.grads(H.dot(g_f, ca) + H.dot(g_r, cb), params, retain_graph=keep)
            ev.grad_phi = [g - a.beta * x for g, x in zip(gf, h, strict=True)]
        if keep:
            ev.outer_hvp = lambda v: H.vjp(g_f, params, v)
        return ev

    # --- one round -----------------------------------------------------------------------------

    def compute_gradients(
        self, model: torch.nn.Module, micro: Sequence[Batch]
    ) -> tuple[Tensor, dict[str, float]]:
        """One OFMU round: inner ascent to θ', outer direction ∇L_r(θ') + 2ρ·∇²Φ(θ')·∇Φ(θ') in ``.grad``.

        Returns:
            The outer objective L_r(θ') + ρ‖∇Φ(θ')‖² (detached) and the round's statistics.
        """
        if not torch.is_grad_enabled():
            raise UnlearnflowError(
                "ofmu needs gradients: it cannot be evaluated under no_grad (a gradient-free optimizer)"
            )
        a = self.args
        params = [p for p in model.parameters() if p.requires_grad]
        start = [p.detach().clone() for p in params] if a.outer_from == "start" else []
        first = ev = self._grad_phi(model, params, micro)
        for t in range(a.inner_steps):
            if t > 0:
                ev = self._grad_phi(model, params, micro)
            with torch.no_grad():
                for p, g in zip(params, ev.grad_phi, strict=True):
                    p.add_(g.to(p.dtype), alpha=a.inner_lr)  # ascent: Φ is maximised
        end = self._grad_phi(model, params, micro, outer=True)
        v, rho = end.grad_phi, self.rho
        direction = end.grad_retain
        if rho > 0:
            if a.outer_hvp == "finite_diff":
                u = H.hvp_finite_diff(
                    lambda: self._grad_phi(model, params, micro).grad_phi,
                    params,
                    v,
                    radius=a.fd_radius,
                    base=v if a.fd_scheme == "forward" else None,
                )
            else:
                assert end.outer_hvp is not None, "kept by _grad_phi(outer=True)"
                u = end.outer_hvp(v)
            direction = [g + 2.0 * rho * x for g, x in zip(direction, u, strict=True)]
        end.outer_hvp = None  # drop the kept graphs now, not when this frame dies
        if a.outer_from == "start":
            with torch.no_grad():
                for p, s in zip(params, start, strict=True):
                    p.copy_(s)
        for p, d in zip(params, direction, strict=True):
            p.grad = d.detach().to(p.dtype).clone()
        phi_norm = float(H.norm(v))
        objective = end.retain + rho * phi_norm**2
        stats = {
            "forget_loss": first.forget,
            "forget_nll": first.forget_nll,
            "retain_loss": end.retain,
            "similarity": end.sim,
            "similarity_start": first.sim,
            "grad_phi_norm": phi_norm,
            "inner_gain": end.forget - first.forget,
            "rho": rho,
        }
        return torch.tensor(objective if math.isfinite(objective) else math.nan), stats

    def after_step(self, stats: Mapping[str, float]) -> dict[str, float]:
        """ρ ← min(ρ_max, κ·ρ) once per optimizer step (the row already logs the ρ it used)."""
        self.rounds += 1
        grown = self.args.rho_growth * self.rho
        self.rho = grown if self.args.rho_max is None else min(self.args.rho_max, grown)
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"rho": self.rho, "rounds": self.rounds}
