"""OFMU (methods/bilevel.py) and its Hessian-vector products (methods/hvp.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import FORGET, RETAIN, encode, mean_prob

from unlearnflow import train
from unlearnflow.config import TrainConfig
from unlearnflow.data.tokenize import collate
from unlearnflow.errors import ConfigError, UnlearnflowError
from unlearnflow.methods import build_method
from unlearnflow.methods import hvp as H
from unlearnflow.methods.bilevel import OFMU, _twice_differentiable
from unlearnflow.optim import OptimizerSpec

CPU = torch.device("cpu")


def streams(tok):
    enc_f, enc_r = encode(tok, FORGET), encode(tok, RETAIN)
    return {"train": enc_f + enc_r, "forget": enc_f, "retain": enc_r}


def micro_batch(tok, forget=FORGET, retain=RETAIN) -> dict:
    """One micro-batch as the loop builds it (weights 1: a single micro-batch per step)."""
    return {
        s: collate(encode(tok, pairs), tok.pad_token_id) | {"token_weight": 1.0, "seq_weight": 1.0}
        for s, pairs in (("forget", forget), ("retain", retain))
    }


def ofmu(**args) -> OFMU:
    method = build_method("ofmu", args)
    assert isinstance(method, OFMU)
    return method


def params_of(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def flat(vec) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in vec])


# --- a small network with a known Hessian ------------------------------------------------------

SHAPES = [(3, 4), (4,), (4,)]  # W1, b1, w2 of x ↦ tanh(x·W1 + b1)·w2


def small_net():
    """Parameters, inputs and two targets (forget / retain) of a 3-4-1 tanh net, float64."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in SHAPES]
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    return (
        params,
        x,
        torch.randn(6, generator=g, dtype=torch.float64),
        torch.randn(6, generator=g, dtype=torch.float64),
    )


def net_loss(params, x, y) -> torch.Tensor:
    w1, b1, w2 = params
    return ((torch.tanh(x @ w1 + b1) @ w2 - y) ** 2).mean()


def unflatten(theta: torch.Tensor) -> list[torch.Tensor]:
    out, i = [], 0
    for s in SHAPES:
        n = int(torch.tensor(s).prod())
        out.append(theta[i : i + n].reshape(s))
        i += n
    return out


def test_exact_hvp_equals_finite_difference_and_the_full_hessian():
    """H·v three ways on a 20-parameter net: double backward (``hvp.vjp`` of a create_graph
    gradient), central differences ‖v‖(∇L(θ + r·v̂) − ∇L(θ − r·v̂))/2r with r = 1e-5 (error O(r²),
    ~1e-10 in float64), and the explicit 20×20 matrix of ``torch.autograd.functional.hessian``
    times flat(v)."""
    params, x, y, _ = small_net()
    v = [torch.randn_like(p) for p in params]
    g = H.grads(net_loss(params, x, y), params, create_graph=True)
    exact = flat(H.vjp(g, params, v))
    fd = flat(H.hvp_finite_diff(lambda: H.grads(net_loss(params, x, y), params), params, v, radius=1e-5))
    base = H.grads(net_loss(params, x, y), params)
    forward = flat(
        H.hvp_finite_diff(lambda: H.grads(net_loss(params, x, y), params), params, v, radius=1e-6, base=base)
    )
    theta = flat(params).detach()
    hessian = torch.autograd.functional.hessian(lambda t: net_loss(unflatten(t), x, y), theta)
    assert hessian.shape == (20, 20)
    torch.testing.assert_close(exact, hessian @ flat(v))
    torch.testing.assert_close(fd, hessian @ flat(v), rtol=1e-6, atol=1e-8)
    # The forward difference ‖v‖(∇L(θ + r·v̂) − ∇L(θ))/r is off by O(r): ~1e-6 relative at r = 1e-6,
    # far from the central difference's 1e-10, and far from a wrong product.
    torch.testing.assert_close(forward, hessian @ flat(v), rtol=1e-4, atol=1e-5)
    assert float((forward - hessian @ flat(v)).abs().max()) > float((fd - hessian @ flat(v)).abs().max())
    torch.testing.assert_close(flat(params).detach(), theta, rtol=0, atol=0)  # perturbations undone


@pytest.mark.parametrize("kind", ["cos", "cos2"])
def test_similarity_gradient_from_hvps_equals_autograd_of_the_cosine(kind):
    """∇_θ sim(∇L_f, ∇L_r) = H_f·a + H_r·b with a = ∂sim/∂g_f, b = ∂sim/∂g_r (ALGORITHMS.md §2):
    for cos, a = g_r/(‖g_f‖‖g_r‖) − c·g_f/‖g_f‖², b symmetric; for cos² both times 2c. The
    reference differentiates F.cosine_similarity of the two create_graph gradients with autograd."""
    params, x, y_f, y_r = small_net()
    g_f = H.grads(net_loss(params, x, y_f), params, create_graph=True)
    g_r = H.grads(net_loss(params, x, y_r), params, create_graph=True)
    c = F.cosine_similarity(flat(g_f), flat(g_r), dim=0, eps=0.0)
    reference = flat(H.grads(c if kind == "cos" else c**2, params, retain_graph=True))
    sim, a, b = H.similarity_terms(H.detach(g_f), H.detach(g_r), kind)
    assert sim == pytest.approx(float(c.detach()) ** (1 if kind == "cos" else 2), rel=1e-12)
    via_exact = flat(H.vjp(g_f, params, a, retain_graph=True)) + flat(
        H.vjp(g_r, params, b, retain_graph=True)
    )
    torch.testing.assert_close(via_exact, reference)
    via_fd = flat(
        H.hvp_finite_diff(lambda: H.grads(net_loss(params, x, y_f), params), params, a, radius=1e-5)
    ) + flat(H.hvp_finite_diff(lambda: H.grads(net_loss(params, x, y_r), params), params, b, radius=1e-5))
    torch.testing.assert_close(via_fd, reference, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["cos", "cos2"])
@pytest.mark.parametrize("mode", ["exact", "finite_diff", "forward"])
def test_the_methods_grad_phi_on_the_tiny_llama(kind, mode, tiny_model, tiny_tokenizer):
    """OFMU's ∇Φ = ∇L_f − β·∇sim on the tiny Llama equals the same built by autograd of the
    similarity of two create_graph gradients (β = 0.5 so the term is not negligible). Finite
    differences in float32 (central, or forward from the gradients at θ) agree to ~1e-3 relative."""
    mb = micro_batch(tiny_tokenizer)
    params = params_of(tiny_model)
    with _twice_differentiable():
        lf = F.cross_entropy(
            tiny_model(input_ids=mb["forget"]["input_ids"], attention_mask=mb["forget"]["attention_mask"])
            .logits[:, :-1]
            .flatten(0, 1),
            mb["forget"]["labels"][:, 1:].flatten(),
        )
        lr = F.cross_entropy(
            tiny_model(input_ids=mb["retain"]["input_ids"], attention_mask=mb["retain"]["attention_mask"])
            .logits[:, :-1]
            .flatten(0, 1),
            mb["retain"]["labels"][:, 1:].flatten(),
        )
    g_f = H.grads(lf, params, create_graph=True)
    g_r = H.grads(lr, params, create_graph=True)
    c = F.cosine_similarity(flat(g_f), flat(g_r), dim=0)
    dsim = flat(H.grads(c if kind == "cos" else c**2, params))
    expected = flat(H.detach(g_f)) - 0.5 * dsim
    args = {"hvp": "finite_diff", "fd_scheme": "forward"} if mode == "forward" else {"hvp": mode}
    ev = ofmu(similarity=kind, beta=0.5, **args)._grad_phi(tiny_model, params, [mb])
    assert ev.forget == pytest.approx(float(lf), rel=1e-5)
    assert ev.retain == pytest.approx(float(lr), rel=1e-5)
    tol = (
        {"rtol": 1e-4, "atol": 1e-6}
        if mode == "exact"
        else {"rtol": 2e-3, "atol": 2e-3 * float(expected.abs().max())}
    )
    torch.testing.assert_close(flat(ev.grad_phi), expected, **tol)


# --- the method ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def learned_state(make_tiny_model, tiny_tokenizer):
    """The tiny Llama after it learned the forget and retain answers (as in test_train)."""
    model = make_tiny_model()
    cfg = TrainConfig(epochs=40, batch_size=4, lr=1e-2)
    train.run(
        model,
        build_method("sft"),
        "adamw",
        streams(tiny_tokenizer),
        cfg,
        pad_token_id=tiny_tokenizer.pad_token_id,
        device=CPU,
    )
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def learned(make_tiny_model, learned_state):
    model = make_tiny_model()
    model.load_state_dict(learned_state)
    return model


@pytest.mark.parametrize("forget_loss", ["nll", "wga"])
def test_the_inner_loop_raises_the_forget_loss(forget_loss, learned, make_tiny_model, tiny_tokenizer):
    """(a) β = 0, T = 3, η_in = 1e-3: Φ = L_f and each step changes it by η_in·‖∇L_f‖² > 0 to first
    order, so inner_gain = L_f(θ') − L_f(θ) > 0, and a descent step would give < 0 (small steps: a
    large step from a minimum of the forget NLL overshoots and raises L_f either way). (b) The
    defaults (β = 0.1, η_in = 0.1, T = 1) raise L_f too. forget_loss is L_f at θ: for nll the
    token-mean NLL of the forget batch, i.e. forget_nll."""
    mb = [micro_batch(tiny_tokenizer)]
    twin = make_tiny_model()
    twin.load_state_dict(learned.state_dict())
    small = ofmu(forget_loss=forget_loss, beta=0.0, inner_steps=3, inner_lr=1e-3, outer_hvp="forget_only")
    _, stats = small.compute_gradients(learned, mb)
    assert stats["inner_gain"] > 0, stats
    if forget_loss == "nll":
        assert stats["forget_loss"] == pytest.approx(stats["forget_nll"], rel=1e-6)
    _, stats = ofmu(forget_loss=forget_loss, outer_hvp="forget_only").compute_gradients(twin, mb)
    assert stats["inner_gain"] > 0, stats


def test_a_run_forgets_and_moves_every_parameter(learned, tiny_tokenizer):
    """A few OFMU rounds with the defaults (AdamW lr 5e-3, as the grad_ascent behaviour test)
    lower the forget answers' probability below half of what was learned and move every weight;
    the rows log ρ₀·κ^k and the method's state holds the next ρ."""
    tok = tiny_tokenizer
    learned_prob = mean_prob(learned, tok, FORGET)
    assert learned_prob > 0.3
    before = {n: p.detach().clone() for n, p in learned.named_parameters()}
    cfg = TrainConfig(epochs=4, batch_size=2, lr=5e-3)
    result = train.run(learned, ofmu(), "adamw", streams(tok), cfg, pad_token_id=tok.pad_token_id, device=CPU)
    assert mean_prob(learned, tok, FORGET) < 0.5 * learned_prob
    for n, p in learned.named_parameters():
        assert not torch.equal(before[n], p.detach()), f"{n} did not move"
    assert [r["rho"] for r in result.rows] == pytest.approx([0.01 * 1.1**k for k in range(4)])
    for key in ("forget_loss", "retain_loss", "similarity", "inner_gain", "forget_nll", "grad_phi_norm"):
        assert all(key in r for r in result.rows), key
    assert result.method_state["rho"] == pytest.approx(0.01 * 1.1**4)


def test_outer_from_start_restores_theta_and_inner_leaves_theta_prime(make_tiny_model, tiny_tokenizer):
    """Both variants write the same direction, computed at θ' = θ + η_in·∇Φ(θ) (T = 1); with
    ``start`` the parameters are θ again on return, with ``inner`` they are θ', so the optimizer
    steps from θ or from θ'. ∇Φ(θ) is recomputed independently on a copy."""
    mb = [micro_batch(tiny_tokenizer)]
    base, twin, probe = make_tiny_model(), make_tiny_model(), make_tiny_model()  # the same θ (seed 0)
    theta = [p.detach().clone() for p in params_of(base)]
    ofmu(outer_from="start").compute_gradients(base, mb)
    ofmu(outer_from="inner").compute_gradients(twin, mb)
    grad_phi = ofmu()._grad_phi(probe, params_of(probe), mb).grad_phi
    for p, q, t, g in zip(params_of(base), params_of(twin), theta, grad_phi, strict=True):
        torch.testing.assert_close(p.grad, q.grad)
        assert torch.equal(p.detach(), t)
        torch.testing.assert_close(q.detach(), t + 0.1 * g)
    assert any(not torch.equal(q.detach(), t) for q, t in zip(params_of(twin), theta, strict=True))


def test_the_outer_hvp_variants(make_tiny_model, tiny_tokenizer):
    """direction − ∇L_r(θ') = 2ρ·∇²Φ(θ')·∇Φ(θ'): ``exact`` (third-order backward) and
    ``finite_diff`` (central difference of ∇Φ) compute the same product; ``forget_only`` uses H_f
    instead of ∇²Φ = H_f − β·∇²sim, so it equals them at β = 0 and not at β = 1. ρ = 1 so the
    penalty is not lost next to ∇L_r; outer_from=start so every variant sees the same θ'."""

    def direction(**kw) -> torch.Tensor:
        model = make_tiny_model()
        ofmu(outer_from="start", rho_init=1.0, **kw).compute_gradients(
            model, [micro_batch(tiny_tokenizer, FORGET[:1], RETAIN[:1])]
        )
        return flat([p.grad for p in params_of(model)])

    exact, fd, only = (direction(beta=1.0, outer_hvp=m) for m in ("exact", "finite_diff", "forget_only"))
    scale = float(exact.abs().max())
    torch.testing.assert_close(fd, exact, rtol=1e-2, atol=1e-2 * scale)
    # Forward differences have an O(r) error, and in float32 a few coordinates of high curvature
    # carry most of it (one machine: 2 of 30,880 beyond 2% of the scale, the vector 2.4% off), so the
    # check is on the whole vector: close to the exact product, far closer than the wrong H_f one.
    forward = direction(beta=1.0, outer_hvp="finite_diff", hvp="finite_diff", fd_scheme="forward")
    off = float((forward - exact).norm() / exact.norm())
    assert off < 0.1
    assert float((only - exact).abs().max()) > 0.05 * scale
    assert float((only - exact).norm() / exact.norm()) > 5 * off
    torch.testing.assert_close(
        direction(beta=0.0, outer_hvp="forget_only"),
        direction(beta=0.0, outer_hvp="exact"),
        rtol=1e-4,
        atol=1e-6 * scale,
    )


@pytest.mark.parametrize(
    ("args", "forwards"),
    [
        ({"hvp": "finite_diff"}, 2 * 6 + 2 * 6),  # 2 ∇Φ of 6 passes, outer: 2 more ∇Φ
        ({"hvp": "finite_diff", "fd_scheme": "forward"}, 2 * 4 + 4),  # 4 passes per ∇Φ, one more ∇Φ
        ({"hvp": "finite_diff", "fd_scheme": "forward", "outer_hvp": "forget_only"}, 2 * 4 + 1),
        ({"hvp": "exact", "outer_hvp": "forget_only"}, 2 * 2),  # one forward per stream, graph reused
    ],
)
def test_passes_per_round(args, forwards, tiny_model, tiny_tokenizer):
    """The model forwards a round (T = 1, β > 0) makes: the cost model of the docstring, counted.
    A ∇Φ by central differences is g_f, g_r and two perturbed gradients per stream (6 passes), by
    forward differences g_f, g_r and one per stream (4); forget_only adds one forget gradient, or
    nothing when the exact graph of θ' is reused."""
    calls = []
    handle = tiny_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        ofmu(**args).compute_gradients(tiny_model, [micro_batch(tiny_tokenizer)])
    finally:
        handle.remove()
    assert len(calls) == forwards


def test_micro_batches_are_one_token_mean(make_tiny_model, tiny_tokenizer):
    """Two micro-batches of one row each, weighted as the loop does (w_m = n_m / mean(n), n_m the
    answer tokens), give the direction and L_f of the single two-row batch: the token means over
    the step are the same sums divided by the same total (test_train's accumulation argument)."""
    tok = tiny_tokenizer
    parts = [micro_batch(tok, [FORGET[i]], [RETAIN[i]]) for i in range(2)]
    for s in ("forget", "retain"):
        n = [int((p[s]["labels"][:, 1:] != -100).sum()) for p in parts]
        assert n[0] != n[1]
        for p, c in zip(parts, n, strict=True):
            p[s]["token_weight"] = c / (sum(n) / 2)
    base, twin = make_tiny_model(), make_tiny_model()
    _, one = ofmu(outer_from="start").compute_gradients(base, [micro_batch(tok)])
    _, two = ofmu(outer_from="start").compute_gradients(twin, parts)
    assert two["forget_loss"] == pytest.approx(one["forget_loss"], rel=1e-5)
    assert two["retain_loss"] == pytest.approx(one["retain_loss"], rel=1e-4)
    torch.testing.assert_close(
        flat([p.grad for p in params_of(twin)]),
        flat([p.grad for p in params_of(base)]),
        rtol=1e-3,
        atol=1e-5,
    )


def test_no_graph_leaks_and_requires_grad_is_kept(tiny_model, tiny_tokenizer):
    """After a round every .grad is a plain tensor (no grad_fn, no requires_grad) and the
    parameters keep requires_grad, for each outer HVP variant (exact keeps graphs the longest)."""
    for mode in ("exact", "finite_diff", "forget_only"):
        ofmu(outer_hvp=mode).compute_gradients(tiny_model, [micro_batch(tiny_tokenizer)])
        for p in tiny_model.parameters():
            assert p.requires_grad and p.grad is not None
            assert p.grad.grad_fn is None and not p.grad.requires_grad


def test_rho_schedule_and_cap():
    """ρ_{k+1} = min(ρ_max, κ·ρ_k): ρ₀ = 0.01, κ = 2, cap 0.05 → 0.02, 0.04, 0.05, 0.05; without a
    cap 0.01·2^k for ever (the paper's schedule)."""
    capped = ofmu(rho_init=0.01, rho_growth=2.0, rho_max=0.05)
    seen = []
    for _ in range(4):
        capped.after_step({})
        seen.append(capped.state_dict()["rho"])
    assert seen == pytest.approx([0.02, 0.04, 0.05, 0.05])
    free = ofmu(rho_init=0.01, rho_growth=2.0, rho_max=None)
    for _ in range(10):
        free.after_step({})
    assert free.state_dict() == {"rho": pytest.approx(0.01 * 2**10), "rounds": 10}


def test_gradient_free_use_is_refused(monkeypatch, tiny_model, tiny_tokenizer):
    """OFMU needs gradients: ``needs_grad`` makes train.run refuse a gradient-free optimizer (none is
    registered yet, so one is faked), and a closure evaluated under no_grad is refused too."""
    method = ofmu()
    assert method.needs_grad and method.owns_backward
    real = train.build_optimizer

    def gradient_free(*args, **kwargs):
        opt, spec = real(*args, **kwargs)
        return opt, OptimizerSpec(spec.Args, spec.factory, requires_grad=False)

    monkeypatch.setattr(train, "build_optimizer", gradient_free)
    with pytest.raises(ConfigError, match="needs gradients"):
        train.run(
            tiny_model,
            method,
            "adamw",
            streams(tiny_tokenizer),
            TrainConfig(),
            pad_token_id=tiny_tokenizer.pad_token_id,
            device=CPU,
        )
    with torch.no_grad(), pytest.raises(UnlearnflowError, match="needs gradients"):
        method.compute_gradients(tiny_model, [micro_batch(tiny_tokenizer)])


def test_bad_args_are_config_errors():
    with pytest.raises(ConfigError, match="hvp: exact"):
        build_method("ofmu", {"hvp": "finite_diff", "outer_hvp": "exact"})
    with pytest.raises(ConfigError, match="inner_lr"):
        build_method("ofmu", {"inner_lr": 0})
    with pytest.raises(ConfigError, match="similarity"):
        build_method("ofmu", {"similarity": "dot"})
