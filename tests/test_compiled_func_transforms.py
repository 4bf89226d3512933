"""torch.compile of torch.func transforms over the losses, against the same transforms of torch's losses.

Dynamo traces an autograd.Function's backward only where it sees an argument that requires grad, judged from
the argument as it first saw it, before torch.func.grad set requires_grad on it: the losses were traced as
their forward alone and the gradients came out as zeros (pytorch/pytorch#193279). The forms dynamo can trace
(one level of grad, vjp, jacrev or vmap) must compile in one graph (fullgraph=True) and be right; the others
(more than one level, forward mode, ordinary autograd around grad or vmap) must be right, or raise as eager
does, without fullgraph (dynamo leaves them to eager torch.func), and raise with it: never answer zeros.
"""

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as TF
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

import fused_train.nn.functional as F

# fp64: what differs from torch is only the order of the sums.
TIGHT = dict(rtol=1e-10, atol=1e-12)
REFUSED = "torch.compile cannot trace this torch.func transform of the loss"

# Dynamo reads torch.func's levels from torch 2.7 on; before, every compiled transform of the losses runs them
# uncompiled (README, Limitations), which only the first test checks.
READS_LEVELS = torch.__version__ >= (2, 7)
needs_levels = pytest.mark.skipif(not READS_LEVELS, reason="torch < 2.7: dynamo cannot read torch.func's levels")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # no compiled code or recompile limit carried between tests
    yield
    torch._dynamo.reset()


def _logits_problem(batch=()):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*batch, 6, 9, generator=g, dtype=torch.float64)
    target = torch.randint(0, 9, (6,), generator=g)
    target[::4] = -100
    weight = torch.rand(9, generator=g, dtype=torch.float64) + 0.5
    return x, target, weight


CROSS_ENTROPY_OPTIONS = {
    "plain": lambda target, weight: (target, {}),
    "weight_smoothing_ignore": lambda target, weight: (target, dict(weight=weight, label_smoothing=0.1)),
    "sum": lambda target, weight: (target, dict(reduction="sum")),
    "probabilities": lambda target, weight: (
        torch.softmax(torch.arange(54, dtype=torch.float64).reshape(6, 9).sin(), -1), dict(label_smoothing=0.2)),
}


def _traced(fn, backend="aot_eager"):
    return torch.compile(fn, backend=backend, fullgraph=True)


@pytest.mark.smoke
def test_compiled_grad_is_right_on_every_torch():
    # Traced in one graph from torch 2.7 on, run uncompiled before: right either way, never zeros.
    x, target, weight = _logits_problem()
    ours = torch.compile(grad(lambda z: F.cross_entropy(z, target, weight=weight)), backend="aot_eager")(x)
    torch.testing.assert_close(ours, grad(lambda z: TF.cross_entropy(z, target, weight=weight))(x), **TIGHT)


@needs_levels
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("options", CROSS_ENTROPY_OPTIONS)
def test_compiled_grad_of_the_logits_matches_torch(options, backend):
    x, target, weight = _logits_problem()
    target, kwargs = CROSS_ENTROPY_OPTIONS[options](target, weight)
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    ours = torch.compile(grad(lambda z: F.cross_entropy(z, target, **kwargs)), backend=counter, fullgraph=True)(x)
    expected = grad(lambda z: TF.cross_entropy(z, target, **kwargs))(x)
    assert counter.frame_count == 1  # compiled, not left to eager
    assert ours.abs().sum() > 0
    torch.testing.assert_close(ours, expected, **TIGHT)


@needs_levels
def test_compiled_grad_under_inductor_matches_torch():
    # The backend users compile with: the loss's ops stay calls, the rest is generated code.
    x, target, weight = _logits_problem()
    w = torch.randn(9, 9, dtype=torch.float64)

    def loss(w, cross_entropy):
        return cross_entropy(torch.tanh(x) @ w, target, weight=weight)

    ours = _traced(grad(lambda w: loss(w, F.cross_entropy)), backend="inductor")(w)
    torch.testing.assert_close(ours, grad(lambda w: loss(w, TF.cross_entropy))(w), **TIGHT)


@needs_levels
@pytest.mark.parametrize("form", ["jacrev", "jacrev_none", "vjp", "vmap", "grad_nd"])
def test_compiled_transforms_dynamo_traces_match_torch(form):
    x, target, weight = _logits_problem()
    xb, _, _ = _logits_problem(batch=(3,))
    if form == "jacrev":
        transform, arg = (lambda f: jacrev(lambda z: f(z, target, weight=weight))), x
    elif form == "jacrev_none":
        transform, arg = (lambda f: jacrev(lambda z: f(z, target, reduction="none"))), x
    elif form == "vjp":
        def transform(f):
            return lambda z: torch.func.vjp(lambda z: f(z, target, reduction="none"), z)[1](torch.ones(6))[0]
        arg = x.clone()
    elif form == "vmap":
        transform, arg = (lambda f: vmap(lambda z: f(z, target, label_smoothing=0.1))), xb
    else:  # (N, C, d) logits: the rows are a view the loss makes itself
        def transform(f):
            return grad(lambda z: f(z.reshape(2, 3, 9).transpose(1, 2), target.reshape(2, 3)))
        arg = x
    ours = _traced(transform(F.cross_entropy))(arg)
    torch.testing.assert_close(ours, transform(TF.cross_entropy)(arg), **TIGHT)


def _forms_left_to_eager(x, xb, target):
    tangent = torch.randn_like(x)

    def loss_of(f):
        return lambda z: f(z, target, label_smoothing=0.1)

    return {
        "vmap_grad": (lambda f: vmap(grad(loss_of(f))), xb),
        "grad_vmap": (lambda f: grad(lambda z: vmap(loss_of(f))(z).sum()), xb),
        "jvp": (lambda f: (lambda z: jvp(loss_of(f), (z,), (tangent,))[1]), x),
        "jacfwd": (lambda f: jacfwd(loss_of(f)), x),
    }


@needs_levels
@pytest.mark.parametrize("form", ["vmap_grad", "grad_vmap", "jvp", "jacfwd"])
def test_compiled_transforms_dynamo_cannot_trace_run_eagerly_and_right(form):
    x, target, _ = _logits_problem()
    xb, _, _ = _logits_problem(batch=(3,))
    transform, arg = _forms_left_to_eager(x, xb, target)[form]
    ours = torch.compile(transform(F.cross_entropy), backend="aot_eager")(arg)
    expected = transform(TF.cross_entropy)(arg)
    assert expected.abs().sum() > 0  # zeros, the failure this guards against, would be caught
    torch.testing.assert_close(ours, expected, **TIGHT)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=REFUSED):
        _traced(transform(F.cross_entropy))(arg)


@needs_levels
def test_compiled_hessian_raises():
    x, target, _ = _logits_problem()
    loss = hessian(lambda z: F.cross_entropy(z, target))
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        torch.compile(loss, backend="aot_eager")(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=REFUSED):
        _traced(loss)(x)


@needs_levels
def test_ordinary_backward_through_a_compiled_vmap_matches_torch():
    # vmap inside the compiled function, autograd outside it: this gave no gradient at all.
    _, target, _ = _logits_problem()
    xb, _, _ = _logits_problem(batch=(3,))
    grads = []
    for cross_entropy, compile_ in ((F.cross_entropy, True), (TF.cross_entropy, False)):
        z = xb.clone().requires_grad_()
        fn = lambda z: vmap(lambda r: cross_entropy(r, target))(z).square().sum()  # noqa: E731
        (torch.compile(fn, backend="aot_eager") if compile_ else fn)(z).backward()
        grads.append(z.grad)
    assert grads[0] is not None
    torch.testing.assert_close(grads[0], grads[1], **TIGHT)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=REFUSED):
        _traced(lambda z: vmap(lambda r: F.cross_entropy(r, target))(z).sum())(xb.clone().requires_grad_())
    with torch.no_grad():  # no gradient wanted: traced in one graph
        torch._dynamo.reset()
        torch.testing.assert_close(_traced(lambda z: vmap(lambda r: F.cross_entropy(r, target))(z))(xb),
                                   vmap(lambda r: TF.cross_entropy(r, target))(xb), **TIGHT)


@needs_levels
@pytest.mark.parametrize("loss", ["cross_entropy", "linear_cross_entropy"])
def test_second_order_through_a_compiled_grad_raises_as_eager(loss):
    # MAML's inner step: ordinary autograd differentiates a torch.func.grad of the loss. Eager raises (no
    # double backward); compiled, dynamo would drop that derivative and answer a partial gradient.
    x, target, _ = _logits_problem()
    w = (torch.eye(9, dtype=torch.float64) + 0.1).requires_grad_()
    if loss == "cross_entropy":
        def inner_loss(v):
            return F.cross_entropy(x @ v, target)
    else:
        def inner_loss(v):
            return F.linear_cross_entropy(x, v.T, target)

    def outer(w):
        return inner_loss(w - 0.5 * grad(inner_loss)(w))

    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(outer(w), w)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(torch.compile(outer, backend="aot_eager")(w), w)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=REFUSED):
        _traced(outer)(w)


@needs_levels
def test_compiled_grad_over_parameters_that_require_grad_matches_torch():
    # Parameters passed as they are (not detached): left to eager torch.func, right to first order.
    torch.manual_seed(0)
    model = torch.nn.Linear(9, 9).double()
    x, target, _ = _logits_problem()

    def grad_of(cross_entropy):
        return grad(lambda p: cross_entropy(functional_call(model, p, (x,)), target))

    params = dict(model.named_parameters())
    torch.testing.assert_close(torch.compile(grad_of(F.cross_entropy), backend="aot_eager")(params),
                               grad_of(TF.cross_entropy)(params), **TIGHT)


@needs_levels
def test_compiled_per_sample_gradients_of_a_model_match_torch():
    # The torch.func tutorial's per-sample gradients, compiled: a transform over grad, left to eager torch.func.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 7)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(4, 5, dtype=torch.float64)
    t = torch.randint(0, 7, (4,))

    def per_sample(cross_entropy):
        def loss(p, xi, ti):
            return cross_entropy(functional_call(model, p, (xi[None],)), ti[None])
        return vmap(grad(loss), in_dims=(None, 0, 0))

    ours = torch.compile(per_sample(F.cross_entropy), backend="aot_eager")(params, x, t)
    expected = per_sample(TF.cross_entropy)(params, x, t)
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], **TIGHT)


# -- linear_cross_entropy --


def _linear_problem():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64)
    w = torch.randn(11, 4, generator=g, dtype=torch.float64) / 2
    b = torch.randn(11, generator=g, dtype=torch.float64)
    target = torch.randint(0, 11, (9,), generator=g)
    target[::5] = -100
    class_weight = torch.rand(11, generator=g, dtype=torch.float64) + 0.5
    return x, w, b, target, class_weight


def _linear_losses(target, class_weight):
    def ours(x, w, b):
        return F.linear_cross_entropy(x, w, target, linear_bias=b, weight=class_weight, label_smoothing=0.1,
                                      chunk_size=4)

    def torchs(x, w, b):
        return TF.cross_entropy(TF.linear(x, w, b), target, weight=class_weight, label_smoothing=0.1)

    return ours, torchs


@needs_levels
@pytest.mark.parametrize("argnums", [0, 1, 2, (0, 1, 2)], ids=["input", "linear_weight", "linear_bias", "all"])
def test_compiled_linear_cross_entropy_grad_matches_torch(argnums):
    x, w, b, target, class_weight = _linear_problem()
    ours, torchs = _linear_losses(target, class_weight)
    got = _traced(grad(ours, argnums=argnums))(x, w, b)
    expected = grad(torchs, argnums=argnums)(x, w, b)
    assert all(e.abs().sum() > 0 for e in torch.utils._pytree.tree_leaves(expected))
    torch.testing.assert_close(got, expected, **TIGHT)


@needs_levels
def test_compiled_linear_cross_entropy_jacrev_and_vmap_match_torch():
    x, w, b, target, class_weight = _linear_problem()
    ours, torchs = _linear_losses(target, class_weight)
    torch.testing.assert_close(_traced(jacrev(ours, argnums=1))(x, w, b), jacrev(torchs, argnums=1)(x, w, b),
                               **TIGHT)
    torch._dynamo.reset()
    xb = torch.stack([x, x.flip(0), 2 * x])
    torch.testing.assert_close(_traced(vmap(ours, in_dims=(0, None, None)))(xb, w, b),
                               vmap(torchs, in_dims=(0, None, None))(xb, w, b), **TIGHT)


@needs_levels
def test_compiled_linear_cross_entropy_per_sample_gradients_match_torch():
    x, w, b, target, class_weight = _linear_problem()
    ours, torchs = _linear_losses(target, class_weight)
    xb = torch.stack([x, x.flip(0), 2 * x])
    per_sample = lambda f: vmap(grad(f, argnums=(1, 2)), in_dims=(0, None, None))  # noqa: E731
    got = torch.compile(per_sample(ours), backend="aot_eager")(xb, w, b)
    torch.testing.assert_close(got, per_sample(torchs)(xb, w, b), **TIGHT)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=REFUSED):
        _traced(per_sample(ours))(xb, w, b)
