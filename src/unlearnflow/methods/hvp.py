"""Hessian-vector products and the gradient of a gradient similarity, for the bilevel method (OFMU).

Everything works on *parameter lists*: a "vector" is a list of tensors shaped like the trainable
parameters, so nothing is flattened into one big copy. ALGORITHMS.md §2 "bilevel" has the maths:
with g_f = ∇L_f, g_r = ∇L_r and c = cos(g_f, g_r),

    ∇c = H_f·(g_r/(‖g_f‖‖g_r‖) − c·g_f/‖g_f‖²) + H_r·(g_f/(‖g_f‖‖g_r‖) − c·g_r/‖g_r‖²),

so ∇sim = H_f·a + H_r·b for the coefficient vectors a, b of :func:`similarity_terms` (for cos² the
chain rule multiplies both by 2c). An HVP H·v is either exact, by double backward (Pearlmutter
1994, "Fast exact multiplication by the Hessian"), or a central difference of two gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor

Vec = list[Tensor]
Similarity = Literal["cos", "cos2"]

# Below this norm a gradient counts as zero: its direction, and so the cosine, is undefined; the
# cosine is then taken as 0 with zero gradient rather than NaN.
NORM_EPS = 1e-12


def _wide(t: Tensor) -> Tensor:
    # Sums over millions of bf16 products lose the result: accumulate in float32 at least.
    return t.to(torch.promote_types(t.dtype, torch.float32))


def dot(u: Sequence[Tensor], v: Sequence[Tensor]) -> Tensor:
    """Σ_i ⟨u_i, v_i⟩ as a scalar tensor (float32, or float64 for float64 inputs)."""
    return sum(((_wide(a) * _wide(b)).sum() for a, b in zip(u, v, strict=True)), torch.zeros(()))


def norm(v: Sequence[Tensor]) -> Tensor:
    """‖v‖₂ over all parameter tensors."""
    return dot(v, v).sqrt()


def detach(v: Sequence[Tensor]) -> Vec:
    return [t.detach() for t in v]


def grads(
    output: Tensor, params: Sequence[Tensor], *, create_graph: bool = False, retain_graph: bool | None = None
) -> Vec:
    """∇ output w.r.t. ``params``; a parameter the output does not depend on gets zeros, not None."""
    if not output.requires_grad:  # a constant (e.g. the cosine of a zero gradient): zero gradient
        return [torch.zeros_like(p) for p in params]
    got = torch.autograd.grad(
        output, list(params), create_graph=create_graph, retain_graph=retain_graph, allow_unused=True
    )
    return [torch.zeros_like(p) if g is None else g for g, p in zip(got, params, strict=True)]


def vjp(
    outputs: Sequence[Tensor],
    params: Sequence[Tensor],
    v: Sequence[Tensor],
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> Vec:
    """Σ_i J_i^T v_i, J_i the Jacobian of ``outputs[i]`` w.r.t. ``params``.

    With ``outputs`` a gradient computed with ``create_graph=True`` this is the exact HVP H·v
    (double backward). Outputs without a graph (a parameter the loss does not reach) add nothing.
    """
    pairs = [(o, w) for o, w in zip(outputs, v, strict=True) if o.requires_grad]
    if not pairs:
        return [torch.zeros_like(p) for p in params]
    got = torch.autograd.grad(
        [o for o, _ in pairs],
        list(params),
        grad_outputs=[w for _, w in pairs],
        create_graph=create_graph,
        retain_graph=retain_graph,
        allow_unused=True,
    )
    return [torch.zeros_like(p) if g is None else g for g, p in zip(got, params, strict=True)]


@contextlib.contextmanager
def shifted(params: Sequence[Tensor], direction: Sequence[Tensor], step: float) -> Iterator[None]:
    """Temporarily θ ← θ + step·direction (in place), restored bit for bit on exit."""
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(d.to(p.dtype), alpha=step)
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def hvp_finite_diff(
    grad_fn: Callable[[], Sequence[Tensor]],
    params: Sequence[Tensor],
    v: Sequence[Tensor],
    *,
    radius: float,
    base: Sequence[Tensor] | None = None,
) -> Vec:
    """H·v ≈ ‖v‖·(∇L(θ + r·v̂) − ∇L(θ − r·v̂)) / 2r, v̂ = v/‖v‖ (central difference, error O(r²)).

    With ``base`` = ∇L(θ) already at hand, the forward difference ‖v‖·(∇L(θ + r·v̂) − ∇L(θ)) / r
    instead: one gradient evaluation rather than two, error O(r) (the curvature's change over r).

    **[choice]** ALGORITHMS.md writes (∇L(θ+rv) − ∇L(θ−rv))/2r; here r is the step along the *unit*
    direction and the result is rescaled by ‖v‖, which is the same quantity but makes ``radius``
    independent of v's scale (∇Φ may have norm 1e-3 or 1e3). Needs float32 weights: in bf16 a
    step of 1e-3 is below the rounding of most weights.

    Args:
        grad_fn: returns ∇L at the current parameters (plain gradients, no graph).
        params: the parameters, perturbed in place and restored exactly.
        v: the vector (parameter-shaped).
        radius: r > 0.
        base: ∇L at the unperturbed parameters, for the forward difference.

    Returns:
        The parameter-shaped product; zeros when v = 0.
    """
    size = float(norm(v))
    if size <= NORM_EPS:
        return [torch.zeros_like(p) for p in params]
    unit = [t / size for t in v]
    with shifted(params, unit, radius):
        plus = [g.detach() for g in grad_fn()]
    if base is not None:
        return [(a - b) * (size / radius) for a, b in zip(plus, base, strict=True)]
    with shifted(params, unit, -radius):
        minus = [g.detach() for g in grad_fn()]
    return [(a - b) * (size / (2.0 * radius)) for a, b in zip(plus, minus, strict=True)]


def similarity(g_f: Sequence[Tensor], g_r: Sequence[Tensor], kind: Similarity) -> Tensor:
    """cos(g_f, g_r), or its square, as a differentiable tensor (0 if either gradient is zero)."""
    nf, nr = norm(g_f), norm(g_r)
    if float(nf.detach()) <= NORM_EPS or float(nr.detach()) <= NORM_EPS:
        return torch.zeros(())
    c = dot(g_f, g_r) / (nf * nr)
    return c if kind == "cos" else c * c


def similarity_terms(
    g_f: Sequence[Tensor], g_r: Sequence[Tensor], kind: Similarity
) -> tuple[float, Vec, Vec]:
    """sim(g_f, g_r) and the vectors a = ∂sim/∂g_f, b = ∂sim/∂g_r, so that ∇_θ sim = H_f·a + H_r·b.

    cos: a = g_r/(‖g_f‖‖g_r‖) − c·g_f/‖g_f‖², b = g_f/(‖g_f‖‖g_r‖) − c·g_r/‖g_r‖².
    cos²: both times 2c (chain rule). Inputs are plain (detached) gradients.

    Returns:
        ``(sim, a, b)``; sim = 0 and a = b = 0 when either gradient is zero.
    """
    nf, nr = float(norm(g_f)), float(norm(g_r))
    if nf <= NORM_EPS or nr <= NORM_EPS:
        zeros = [torch.zeros_like(t) for t in g_f]
        return 0.0, zeros, [torch.zeros_like(t) for t in g_r]
    c = float(dot(g_f, g_r)) / (nf * nr)
    scale = 1.0 if kind == "cos" else 2.0 * c
    a = [scale * (r / (nf * nr) - c * f / nf**2) for f, r in zip(g_f, g_r, strict=True)]
    b = [scale * (f / (nf * nr) - c * r / nr**2) for f, r in zip(g_f, g_r, strict=True)]
    return (c if kind == "cos" else c * c), a, b
