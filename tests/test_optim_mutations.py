"""What users do to an optimizer between steps — clear or replace its state, move state tensors, swap params,
switch options on, load checkpoints through hooks, skip steps with GradScaler, compile the step under a
scheduler — and torch.optim honours: fused_train must do what torch does, compared in the same test."""

import copy
from collections import defaultdict

import pytest
import torch

import fused_train
from fused_train.reference import torch_optimizer

from conftest import DEVICES, TOL, TORCH_VERSION

CONFIGS = [
    ("Adam", dict(lr=0.01)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3)),
    ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True)),
]
IDS = [name for name, _ in CONFIGS]


def _twins(name, cfg, device, shapes=((5, 3), (7,), (2, 2, 2))):
    torch.manual_seed(0)
    params = [torch.randn(s, device=device) for s in shapes]
    fused_params = [p.clone().requires_grad_() for p in params]
    torch_params = [p.clone().requires_grad_() for p in params]
    return [
        (fused_params, getattr(fused_train.optim, name)(fused_params, **cfg)),
        (torch_params, torch_optimizer(name)(torch_params, **cfg)),
    ]


def _step(params, opt, seed):
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(p.device)
    opt.step()


def _assert_same(twins, state_dict=True):
    (fused_params, fused_opt), (torch_params, torch_opt) = twins
    for fp, tp in zip(fused_params, torch_params):
        torch.testing.assert_close(fp, tp, **TOL[torch.float32])
        fs, ts = fused_opt.state[fp], torch_opt.state[tp]
        assert fs.keys() == ts.keys()
        for key, value in ts.items():
            if key == "step":
                assert float(fs[key]) == float(value)
            else:
                torch.testing.assert_close(fs[key], value, **TOL[torch.float32])
    if not state_dict:
        return  # torch.optim's state_dict() raises once a param with state left the groups
    fused_state, torch_state = fused_opt.state_dict()["state"], torch_opt.state_dict()["state"]
    assert fused_state.keys() == torch_state.keys()
    for index, saved in torch_state.items():
        assert fused_state[index].keys() == saved.keys(), index
        for key, value in saved.items():
            if key == "step":
                assert float(fused_state[index][key]) == float(value), (index, key)
            else:
                torch.testing.assert_close(fused_state[index][key], value, **TOL[torch.float32])


def _clear_state(params, opt):
    opt.state.clear()


def _fresh_state_dict(params, opt):
    opt.state = defaultdict(dict)


def _reassign_state_tensors(params, opt):
    # The loop that moves optimizer state between devices after a step (here: new tensors, same device).
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                state[key] = value.clone()


def _replace_state_dicts(params, opt):
    for p in params:
        opt.state[p] = {key: v.clone() if isinstance(v, torch.Tensor) else v for key, v in opt.state[p].items()}


MUTATIONS = [_clear_state, _fresh_state_dict, _reassign_state_tensors, _replace_state_dicts]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mutate", MUTATIONS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("name,cfg", CONFIGS, ids=IDS)
def test_state_mutations_between_steps_act_as_in_torch(name, cfg, mutate, device):
    twins = _twins(name, cfg, device)
    for params, opt in twins:
        for seed in range(3):
            _step(params, opt, seed)
        mutate(params, opt)
        for seed in range(3, 7):
            _step(params, opt, seed)
    _assert_same(twins)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,cfg", CONFIGS, ids=IDS)
def test_reassigned_state_is_what_the_next_step_updates(name, cfg, device):
    # The state tensors assigned after a step are the ones stepped from then on (the old ones stay as they
    # were), and the saved step counts every step: 8 after 8 steps, not 4.
    twins = _twins(name, cfg, device)
    for params, opt in twins:
        for seed in range(4):
            _step(params, opt, seed)
        old = {id(v): (v, v.clone()) for st in opt.state.values() for v in st.values() if torch.is_tensor(v)}
        _reassign_state_tensors(params, opt)
        for seed in range(4, 8):
            _step(params, opt, seed)
        for value, snapshot in old.values():
            assert torch.equal(value, snapshot), "a replaced state tensor was still updated"
    _assert_same(twins)
    if name != "SGD":
        assert {float(st["step"]) for st in twins[0][1].state.values()} == {8.0}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,cfg", CONFIGS, ids=IDS)
def test_state_dict_after_state_clear_holds_the_new_state(name, cfg, device):
    (params, opt), _ = _twins(name, cfg, device)
    _step(params, opt, 0)
    opt.state.clear()
    _step(params, opt, 1)
    saved = opt.state_dict()["state"]
    assert sorted(saved) == [0, 1, 2]
    if name != "SGD":
        assert {float(st["step"]) for st in saved.values()} == {1.0}, "state restarts from step 0 after clear()"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,cfg", CONFIGS, ids=IDS)
def test_param_replaced_in_param_group_is_stepped(name, cfg, device):
    twins = _twins(name, cfg, device)
    torch.manual_seed(1)
    replacement = torch.randn(4, 4, device=device)
    for params, opt in twins:
        _step(params, opt, 0)
        old = params[1]
        old_value = old.detach().clone()
        params[1] = replacement.clone().requires_grad_()
        opt.param_groups[0]["params"][1] = params[1]
        for seed in range(1, 4):
            _step(params, opt, seed)
        assert torch.equal(old, old_value), "the replaced param must no longer be stepped"
        assert not torch.equal(params[1], replacement), "the new param must be stepped"
    _assert_same(twins, state_dict=False)


@pytest.mark.parametrize("device", DEVICES)
def test_params_added_to_and_removed_from_a_group_and_groups_removed(device):
    twins = _twins("Adam", dict(lr=0.01), device)
    for params, opt in twins:
        _step(params, opt, 0)
        extra = torch.ones(3, device=device, requires_grad=True)
        params.append(extra)
        opt.param_groups[0]["params"].append(extra)
        _step(params, opt, 1)
        removed = params.pop(0)
        opt.param_groups[0]["params"].remove(removed)
        _step(params, opt, 2)
    _assert_same(twins, state_dict=False)
    for params, opt in twins:
        second = torch.zeros(2, device=device, requires_grad=True)
        opt.add_param_group({"params": [second]})
        _step(params + [second], opt, 3)
        del opt.param_groups[1]
        _step(params, opt, 4)
    _assert_same(twins, state_dict=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,cfg,switch", [
    ("SGD", dict(lr=0.05, momentum=0.0), dict(momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.0, dampening=0.5), dict(momentum=0.9)),
], ids=["momentum", "momentum-dampening"])
def test_momentum_switched_on_after_the_first_step_starts_its_buffer_then(name, cfg, switch, device):
    twins = _twins(name, cfg, device)
    for params, opt in twins:
        _step(params, opt, 0)
        opt.param_groups[0].update(switch)
        for seed in range(1, 5):
            _step(params, opt, seed)  # must not raise, and must not lose this step
    _assert_same(twins)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,cfg,switch", [
    ("Adam", dict(lr=0.01), dict(amsgrad=True)),
    ("RMSprop", dict(lr=0.01), dict(centered=True, momentum=0.5)),
], ids=["amsgrad", "centered-momentum"])
def test_state_options_switched_on_later_step_at_once(name, cfg, switch, device):
    # torch.optim raises KeyError here (it creates this state only at the first step); fused_train starts it
    # at zero, which is what torch does for a fresh optimizer, and takes the step instead of losing it.
    (params, opt), _ = _twins(name, cfg, device)
    _step(params, opt, 0)
    opt.param_groups[0].update(switch)
    before = [p.detach().clone() for p in params]
    _step(params, opt, 1)
    assert all(not torch.equal(b, p) for b, p in zip(before, params))
    assert {float(st["step"]) for st in opt.state.values()} == {2.0}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dampening", [0.0, 0.5])
def test_sgd_momentum_after_a_skipped_first_step_starts_from_the_gradient(dampening, device):
    torch.manual_seed(3)
    model = torch.nn.Linear(6, 4).to(device)
    twin = copy.deepcopy(model)
    cfg = dict(lr=0.05, momentum=0.9, dampening=dampening)
    runs = [(model, fused_train.optim.SGD(model.parameters(), **cfg)),
            (twin, torch.optim.SGD(twin.parameters(), **cfg))]
    x = torch.randn(5, 6, device=device)
    for m, opt in runs:
        scaler = torch.amp.GradScaler(device, init_scale=2.0**8)
        for step in range(4):
            opt.zero_grad()
            scaler.scale(m(x).square().mean()).backward()
            if step == 0:
                next(m.parameters()).grad[0, 0] = float("inf")  # GradScaler skips the very first step
            scaler.step(opt)
            scaler.update()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(runs[0][1].state[p]["momentum_buffer"], runs[1][1].state[q]["momentum_buffer"],
                                   **TOL[torch.float32])


@pytest.mark.parametrize("name,cfg", CONFIGS, ids=IDS)
def test_load_state_dict_hooks_act_as_in_torch(name, cfg):
    twins = _twins(name, cfg, "cpu")
    for params, opt in twins:
        for seed in range(2):
            _step(params, opt, seed)
    saved = [copy.deepcopy(opt.state_dict()) for _, opt in twins]
    replaced = {}
    for (params, opt), sd in zip(twins, saved):
        def halve_lr_and_state(optimizer, state_dict):
            state_dict = copy.deepcopy(state_dict)
            state_dict["param_groups"][0]["lr"] = 0.5 * state_dict["param_groups"][0]["lr"]
            for st in state_dict["state"].values():
                for key, value in st.items():
                    if key != "step" and torch.is_tensor(value):
                        st[key] = value * 0.5
            return state_dict

        def replace_first_state(optimizer):
            p = optimizer.param_groups[0]["params"][0]
            key = next(k for k in optimizer.state[p] if k != "step")
            optimizer.state[p][key] = torch.full_like(optimizer.state[p][key], 0.25)
            replaced[id(optimizer)] = optimizer.state[p][key]

        opt.register_load_state_dict_pre_hook(halve_lr_and_state)
        opt.register_load_state_dict_post_hook(replace_first_state)
        opt.load_state_dict(sd)
        assert opt.param_groups[0]["lr"] == 0.5 * cfg["lr"]
        p = opt.param_groups[0]["params"][0]
        key = next(k for k in opt.state[p] if k != "step")
        assert opt.state[p][key] is replaced[id(opt)], "a post-hook's state must survive load_state_dict"
        torch.testing.assert_close(opt.state[p][key], torch.full_like(p, 0.25))
        for seed in range(2, 5):
            _step(params, opt, seed)
    _assert_same(twins)


@pytest.mark.parametrize("betas", [(torch.tensor(0.9), 0.999), (0.9, torch.tensor(0.999))])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_mixed_tensor_and_float_betas_are_refused_like_torch(name, betas):
    p = [torch.zeros(3, requires_grad=True)]
    message = "betas must be either both floats or both Tensors"
    if TORCH_VERSION >= (2, 6):  # older torch took any betas; fused_train refuses the mix on every torch
        with pytest.raises(ValueError, match=message):
            torch_optimizer(name)(p, betas=betas)
    with pytest.raises(ValueError, match=message):
        getattr(fused_train.optim, name)(p, betas=betas)


@pytest.mark.skipif(TORCH_VERSION < (2, 7), reason="torch.optim.Adam steps with tensor betas from torch 2.7")
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_tensor_betas_step_like_torch_and_stay_tensors(name):
    betas = (torch.tensor([0.8]), torch.tensor(0.99))
    twins = _twins(name, dict(lr=0.01), "cpu")
    twins = [(params, type(opt)(params, lr=0.01, betas=betas)) for params, opt in twins]
    # 0-dim as torch >= 2.6 makes them (older torch keeps the shape given)
    assert all(isinstance(b, torch.Tensor) and b.dim() == 0 for b in twins[0][1].param_groups[0]["betas"])
    for params, opt in twins:
        assert all(isinstance(b, torch.Tensor) for b in opt.param_groups[0]["betas"])
        for seed in range(3):
            _step(params, opt, seed)
    _assert_same(twins)


def _graphs_compiled(opt_class, steps):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = opt_class(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)
    compiled_step = torch.compile(opt.step)
    x = torch.randn(2, 8)
    for _ in range(steps):
        model(x).square().sum().backward()
        compiled_step()
        opt.zero_grad()
        scheduler.step()
    return counters["stats"]["unique_graphs"], [p.detach().clone() for p in model.parameters()]


def test_compiled_step_does_not_recompile_when_a_scheduler_changes_a_float_lr():
    torch_graphs, torch_params = _graphs_compiled(torch.optim.Adam, 12)
    fused_graphs, fused_params = _graphs_compiled(fused_train.optim.Adam, 12)
    torch._dynamo.reset()
    assert fused_graphs <= max(torch_graphs, 3), (fused_graphs, torch_graphs)
    for a, b in zip(fused_params, torch_params):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize("mutate", [_clear_state, _reassign_state_tensors], ids=lambda f: f.__name__.strip("_"))
def test_compiled_step_sees_state_mutations(mutate):
    twins = _twins("Adam", dict(lr=0.01), "cpu")
    (fused_params, fused_opt), (torch_params, torch_opt) = twins
    torch._dynamo.reset()
    compiled_step = torch.compile(fused_opt.step)
    for params, opt, step in ((fused_params, fused_opt, compiled_step), (torch_params, torch_opt, torch_opt.step)):
        for seed in range(6):
            if seed == 3:
                mutate(params, opt)
            generator = torch.Generator().manual_seed(seed)
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            step()
    torch._dynamo.reset()
    _assert_same(twins)


@pytest.mark.parametrize("key,bad,error", [
    ("exp_avg", lambda v: v.to("meta"), "exp_avg' is on meta but its param is on cpu"),
    ("exp_avg_sq", lambda v: v.reshape(-1)[:-1].clone(), "exp_avg_sq' has shape"),
    ("exp_avg", lambda v: [1.0], "exp_avg' must be a tensor"),
])
def test_reassigned_state_the_kernel_cannot_step_raises_before_any_param_moves(key, bad, error):
    (params, opt), _ = _twins("Adam", dict(lr=0.01), "cpu")
    _step(params, opt, 0)
    opt.state[params[2]][key] = bad(opt.state[params[2]][key])
    before = [p.detach().clone() for p in params]
    steps = [float(opt.state[p]["step"]) for p in params[:2]]
    with pytest.raises((ValueError, TypeError), match=error):
        _step(params, opt, 1)
    assert all(torch.equal(b, p) for b, p in zip(before, params))
    assert [float(opt.state[p]["step"]) for p in params[:2]] == steps


def test_reassigned_state_in_another_dtype_is_converted_for_the_kernel():
    twins = _twins("Adam", dict(lr=0.01), "cpu")
    for params, opt in twins:
        _step(params, opt, 0)
        for state in opt.state.values():
            state["step"] = torch.tensor(float(state["step"]), dtype=torch.float64)
            if opt is twins[0][1]:  # (torch.optim's step raises on fp64 moments of an fp32 param)
                state["exp_avg"] = state["exp_avg"].double()  # exact: the fp32 values, widened
        _step(params, opt, 1)
    fused_opt = twins[0][1]
    assert all(st["exp_avg"].dtype == torch.float32 and st["step"].dtype == torch.float32
               for st in fused_opt.state.values())
    _assert_same(twins)


@pytest.mark.parametrize("name,cfg", [("SGD", dict(lr=0.01, momentum=0.9)), ("RMSprop", dict(lr=0.01, momentum=0.9)),
                                      ("Adam", dict(lr=0.01))], ids=["SGD", "RMSprop", "Adam"])
def test_compiled_step_under_one_cycle_momentum_schedule_matches_torch(name, cfg):
    # OneCycleLR moves momentum (betas for Adam) every step: traced, those values become symbolic.
    twins = _twins(name, cfg, "cpu")
    torch._dynamo.reset()
    for index, (params, opt) in enumerate(twins):
        scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=20)
        step = torch.compile(opt.step) if index == 0 else opt.step
        for seed in range(6):
            generator = torch.Generator().manual_seed(seed)
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            step()
            scheduler.step()
    torch._dynamo.reset()
    _assert_same(twins)
