"""fused_train's cross-entropy under torch.func transforms (grad, vmap, per-sample gradients, jacrev, jvp),
each against the same code with torch.nn.functional.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap

from conftest import DEVICES
from fused_train.nn.functional import cross_entropy

# fp64 throughout: what differs is only the order of the sums (rows, classes, samples).
TIGHT = dict(rtol=1e-10, atol=1e-12)

OPTIONS = [
    dict(),
    dict(weighted=True, ignore=True),
    dict(label_smoothing=0.1, ignore=True),
    dict(prob=True, label_smoothing=0.2),
]
OPTION_IDS = ["plain", "weight_ignore", "smooth_ignore", "prob_smooth"]


def _problem(device, rows, classes, batch=(), weighted=False, ignore=False, prob=False, label_smoothing=0.0):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(*batch, rows, classes, generator=g, dtype=torch.float64).to(device)
    if prob:
        logits = torch.randn(*batch, rows, classes, generator=g, dtype=torch.float64)
        target = torch.softmax(logits, -1).to(device)
    else:
        target = torch.randint(0, classes, (*batch, rows), generator=g).to(device)
        if ignore:
            target[..., ::3] = -100
    weight = (torch.rand(classes, generator=g, dtype=torch.float64) + 0.5).to(device) if weighted else None
    return x, target, dict(weight=weight, label_smoothing=label_smoothing)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_func_grad_matches_torch(device, reduction, options):
    x, target, kw = _problem(device, 9, 13, **options)
    ours = grad(lambda z: cross_entropy(z, target, reduction=reduction, **kw))(x)
    ref = grad(lambda z: F.cross_entropy(z, target, reduction=reduction, **kw))(x)
    torch.testing.assert_close(ours, ref, **TIGHT)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_vmap_over_a_batch_of_losses_matches_torch(device, reduction, options):
    # A batch of 4 independent (7, 11) problems: 'mean' divides each by its own weight of rows kept.
    x, target, kw = _problem(device, 7, 11, batch=(4,), **options)
    ours = vmap(lambda z, t: cross_entropy(z, t, reduction=reduction, **kw))(x, target)
    ref = vmap(lambda z, t: F.cross_entropy(z, t, reduction=reduction, **kw))(x, target)
    torch.testing.assert_close(ours, ref, **TIGHT)
    # the vmapped dimension need not come first, and an unbatched target is broadcast
    ours = vmap(lambda z: cross_entropy(z, target[0], reduction=reduction, **kw), in_dims=1)(x.movedim(0, 1))
    ref = vmap(lambda z: F.cross_entropy(z, target[0], reduction=reduction, **kw), in_dims=1)(x.movedim(0, 1))
    torch.testing.assert_close(ours, ref, **TIGHT)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_per_sample_gradients_of_a_linear_model_match_torch(device, options):
    # torch.func's per-sample-gradient recipe: vmap(grad(loss of one sample)) over a small linear model,
    # each sample a sequence of 5 positions (ignored ones included) with a 'mean' loss of its own.
    x, target, kw = _problem(device, 5, 6, batch=(8,), **options)
    features = x.detach()  # (8, 5, 6) inputs; the model maps 6 features to 6 classes
    model = torch.nn.Linear(6, 6, dtype=torch.float64).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def per_sample(loss_fn):
        def loss_of_one(p, xs, ts):
            return loss_fn(functional_call(model, p, (xs,)), ts, **kw)
        return vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, features, target)

    ours = per_sample(cross_entropy)
    ref = per_sample(F.cross_entropy)
    for name in params:
        assert ours[name].shape == (8, *params[name].shape)
        torch.testing.assert_close(ours[name], ref[name], **TIGHT)


@pytest.mark.parametrize("device", DEVICES)
def test_jacobians_and_jvp_match_torch(device):
    x, target, kw = _problem(device, 6, 10, weighted=True, ignore=True, label_smoothing=0.1)
    for reduction in ("none", "mean"):
        for jacobian in (jacrev, jacfwd):
            ours = jacobian(lambda z: cross_entropy(z, target, reduction=reduction, **kw))(x)
            ref = jacobian(lambda z: F.cross_entropy(z, target, reduction=reduction, **kw))(x)
            torch.testing.assert_close(ours, ref, **TIGHT)
        tangent = torch.randn_like(x)
        ours = jvp(lambda z: cross_entropy(z, target, reduction=reduction, **kw), (x,), (tangent,))
        ref = jvp(lambda z: F.cross_entropy(z, target, reduction=reduction, **kw), (x,), (tangent,))
        torch.testing.assert_close(ours, ref, **TIGHT)


@pytest.mark.parametrize("device", DEVICES)
def test_transforms_leave_the_logits_alone_with_inplace_backward(device):
    # inplace_backward writes the gradient over the logits; under torch.func it is ignored (no mutation).
    x, target, _ = _problem(device, 4, 9)
    before = x.clone()
    ours = grad(lambda z: cross_entropy(z * 1, target, inplace_backward=True))(x)
    torch.testing.assert_close(ours, grad(lambda z: F.cross_entropy(z, target))(x), **TIGHT)
    assert torch.equal(x, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_vmap_over_class_weights_matches_torch_sample_by_sample(device, reduction):
    # A class weight per sample (one call per sample), alone and with the logits and targets batched too.
    x, target, _ = _problem(device, 4, 9, batch=(3,), ignore=True, label_smoothing=0.1)
    weights = torch.rand(3, 9, dtype=torch.float64, device=device) + 0.1

    def ours(z, t, w):
        return cross_entropy(z, t, weight=w, reduction=reduction, label_smoothing=0.1)

    def ref(z, t, w):
        return F.cross_entropy(z, t, weight=w, reduction=reduction, label_smoothing=0.1)

    expected = torch.stack([ref(x[i], target[i], weights[i]) for i in range(3)])
    torch.testing.assert_close(vmap(ours)(x, target, weights), expected, **TIGHT)
    expected = torch.stack([ref(x[0], target[0], weights[i]) for i in range(3)])
    torch.testing.assert_close(vmap(ours, in_dims=(None, None, 0))(x[0], target[0], weights), expected, **TIGHT)
    if reduction != "none":
        grads = vmap(grad(ours))(x, target, weights)
        expected = torch.stack([grad(ref)(x[i], target[i], weights[i]) for i in range(3)])
        torch.testing.assert_close(grads, expected, **TIGHT)


def test_hessian_and_grad_of_grad_raise_instead_of_answering_zero():
    x, target, _ = _problem("cpu", 4, 9)
    loss = lambda z: cross_entropy(z, target)  # noqa: E731
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        torch.func.hessian(loss)(x)
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        grad(lambda z: grad(loss)(z).sum())(x)
    # and of the forward-mode derivative: reverse or forward over it (these gave 0 and a pytree error)
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        jacrev(jacfwd(loss))(x)
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        jacfwd(jacfwd(loss))(x)


def test_grad_with_respect_to_the_class_weight_raises():
    # As torch's and as fused_train's ordinary autograd: no derivative for weight, rather than zeros.
    x, target, options = _problem("cpu", 6, 9, weighted=True)
    with pytest.raises(RuntimeError, match="derivative for 'weight' is not implemented"):
        grad(lambda w: cross_entropy(x, target, weight=w))(options["weight"])

