"""fused_train optimizers under torch.distributed on one machine: DDP, ZeroRedundancyOptimizer and FSDP2 with
torch.distributed.checkpoint, each in 2 gloo processes on loopback, bounded in time."""

import math
import os
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fused_train

from conftest import TORCH_VERSION

WORLD = 2
TIMEOUT_S = 120
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


class _HeadAndLoss(torch.nn.Module):
    """A body and an LM-style head + loss (fused_train.nn.LinearCrossEntropyLoss), whose forward returns the
    loss, as a DDP-wrapped language model's does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
        self.head = fused_train.nn.LinearCrossEntropyLoss(16, 4, bias=True, chunk_size=4)

    def forward(self, x, y):
        return self.head(self.body(x), y)


def _model_8bit() -> torch.nn.Module:
    """A model whose middle weight (256 × 256) keeps 8-bit state at the default min_8bit_size, and whose rows of 256
    elements keep it so when FSDP2 shards them (the other params are under 4096 elements: fp32 state)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 4))


def _optimizer(scenario, params):
    cls = fused_train.optim.AdamW8bit if scenario.endswith("adamw8bit") else fused_train.optim.AdamW
    return cls(params, lr=1e-2, bf16_stochastic_round=scenario.endswith("bf16_stochastic_round"))


def _loss(model, scenario, x, y):
    if scenario == "ddp_linear_cross_entropy":
        return model(x, y)
    if scenario.endswith("bf16_stochastic_round"):
        return torch.nn.functional.cross_entropy(model(x.to(torch.bfloat16)).float(), y)
    return torch.nn.functional.cross_entropy(model(x), y)


def _global_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(WORLD * 6, 8, generator=g), torch.randint(0, 4, (WORLD * 6,), generator=g)


def _local_batch(step: int, rank: int):
    x, y = _global_batch(step)
    return x[rank * 6:(rank + 1) * 6], y[rank * 6:(rank + 1) * 6]


def _single_process_reference(scenario: str) -> list[torch.Tensor]:
    model = (_HeadAndLoss() if scenario == "ddp_linear_cross_entropy" else
             _model_8bit() if scenario.endswith("adamw8bit") else _model())
    if scenario.endswith("bf16_stochastic_round"):
        model = model.to(torch.bfloat16)
    opt = _optimizer(scenario, model.parameters())
    for step in range(STEPS):
        x, y = _global_batch(step)
        _loss(model, scenario, x, y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank, scenario, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = _model()
        if scenario == "ddp_linear_cross_entropy":
            model = torch.nn.parallel.DistributedDataParallel(_HeadAndLoss())
            opt = fused_train.optim.AdamW(model.parameters(), lr=1e-2)
        elif scenario == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
            opt = fused_train.optim.AdamW(model.parameters(), lr=1e-2)
        elif scenario == "ddp_bf16_stochastic_round":
            # bf16 weights without masters: every rank draws the same rounding bits, so replicas stay equal
            model = torch.nn.parallel.DistributedDataParallel(model.to(torch.bfloat16))
            opt = fused_train.optim.AdamW(model.parameters(), lr=1e-2, bf16_stochastic_round=True)
        elif scenario == "zero":
            model = torch.nn.parallel.DistributedDataParallel(model)
            from torch.distributed.optim import ZeroRedundancyOptimizer

            opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=fused_train.optim.AdamW, lr=1e-2)
        else:  # fsdp2, fsdp2_bf16_stochastic_round (bf16 weights without masters), fsdp2_adamw8bit; sharded
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            if scenario.endswith("adamw8bit"):
                model = _model_8bit()
            if scenario == "fsdp2_bf16_stochastic_round":
                model = model.to(torch.bfloat16)
            mesh = init_device_mesh("cpu", (WORLD,))
            for layer in model:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = _optimizer(scenario, model.parameters())
        for step in range(STEPS):
            x, y = _local_batch(step, rank)
            _loss(model, scenario, x, y).backward()
            opt.step()
            opt.zero_grad()
        if scenario.startswith("fsdp2"):
            _fsdp2_checkpoint_round_trip(model, opt, out_dir, scenario)
            params = [p.full_tensor().detach() for p in model.parameters()]
        else:
            params = [p.detach() for p in model.parameters()]
        # No rank may tear the group down while the other is still in a collective (gloo aborts then). The
        # result is written after the barrier: every collective of both ranks has completed by then.
        dist.barrier()
        torch.save(params, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _fsdp2_checkpoint_round_trip(model, opt, out_dir, scenario):
    """Saves sharded optimizer state with torch.distributed.checkpoint, reloads it into a fresh optimizer,
    and checks every state tensor came back (on this rank's shard)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    ckpt = os.path.join(out_dir, "dcp")
    saved = get_optimizer_state_dict(model, opt)
    dcp.save({"optim": saved}, checkpoint_id=ckpt)
    fresh = _optimizer(scenario, model.parameters())
    target = {"optim": get_optimizer_state_dict(model, fresh)}
    dcp.load(target, checkpoint_id=ckpt)
    set_optimizer_state_dict(model, fresh, target["optim"])
    quantized = 0
    for p in model.parameters():
        assert sorted(opt.state[p]) == sorted(fresh.state[p])
        quantized += "exp_avg_codes" in opt.state[p]
        for key in opt.state[p]:
            a, b = opt.state[p][key], fresh.state[p][key]
            a = a.to_local() if hasattr(a, "to_local") else a
            b = b.to_local() if hasattr(b, "to_local") else b
            assert torch.equal(a, b), f"{key} differs after a DCP round trip"
    # AdamW8bit: the 256 × 256 weight's state is 8-bit on each rank's rows (the others are under min_8bit_size)
    assert quantized == (1 if scenario.endswith("adamw8bit") else 0)


def _run_workers(worker, args, out_dir, teardown_may_crash=False, label=None, world=WORLD) -> list:
    """Runs ``worker(rank, *args)`` in ``world`` spawned processes, bounded by TIMEOUT_S, and returns what each rank
    saved as rank{r}.pt in out_dir. With ``teardown_may_crash``, a worker that dies after every rank has written its
    result (after the last barrier: in torch's process-group teardown, where gloo has aborted a worker — "terminate
    called without an active exception", once in a CI run on 2026-11-28, the ZeRO scenario) does not fail the run; a
    crash before that leaves a result missing and does."""
    ctx = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    results = [os.path.join(out_dir, f"rank{r}.pt") for r in range(world)]
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"{label or worker.__name__}: workers did not finish within {TIMEOUT_S} s")
    except mp.ProcessExitedException:
        if not (teardown_may_crash and all(os.path.exists(path) for path in results)):
            raise
    return [torch.load(path) for path in results]


def _run(scenario: str) -> list[list[torch.Tensor]]:
    with tempfile.TemporaryDirectory() as out_dir:
        return _run_workers(_worker, (scenario, _free_port(), out_dir), out_dir, teardown_may_crash=True,
                            label=scenario)


# -- bf16 stochastic rounding of DTensor shards (FSDP2's params) ---------------------------------------------------
# Each param is given whole on every rank, with its gradients, and stepped as a DTensor of the placement below; the
# shards' rounding must draw the whole tensor's bits (offsets), so a dim-0 sharding ends bit for bit where one
# process ends. Shapes: even and uneven row cuts, a rank with an empty shard, 1-D and 3-D: none may change a bit.
_SHARD_SHAPES = [(64, 33), (7, 5), (1, 9), (3,), (2, 3, 129)]


def _sharded_rounding_params():
    g = torch.Generator().manual_seed(11)
    params = [torch.randn(shape, generator=g).to(torch.bfloat16) for shape in _SHARD_SHAPES]
    grads = [[torch.randn(shape, generator=g).to(torch.bfloat16) for shape in _SHARD_SHAPES] for _ in range(STEPS)]
    # The Shard(1) case: a (16, 2 * 40) tensor whose two column halves, and their gradients, are equal.
    half = torch.randn(16, 40, generator=g).to(torch.bfloat16)
    twin = torch.cat([half, half], dim=1)
    twin_grad = torch.randn(16, 40, generator=g).to(torch.bfloat16)
    return params, grads, twin, torch.cat([twin_grad, twin_grad], dim=1)


def _step_sharded_rounding(params, grads, make_param, make_grad, compiled=False, cls=None):
    # (make_param gets a copy: a Replicate DTensor's local tensor may be the very tensor it was made from.)
    model = [torch.nn.Parameter(make_param(p.clone())) for p in params]
    cls = cls or fused_train.optim.AdamW
    opt = cls(model, lr=1e-2, weight_decay=0.1, bf16_stochastic_round=True)
    step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
    for step_grads in grads:
        for p, grad in zip(model, step_grads):
            p.grad = make_grad(grad)
        step()
    return model


def _sharded_rounding_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (WORLD,))
        mesh_2d = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("a", "b"))
        mesh_2d_t = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("c", "d"))
        params, grads, twin, twin_grads = _sharded_rounding_params()
        results = {}
        for name, on, spec, compiled in _SHARDED_CASES:
            m = {"1d": mesh, "2d": mesh_2d, "2d_t": mesh_2d_t}[on]
            placements = [Replicate() if p == "R" else Shard(int(p[1:])) for p in spec.split()]
            cls = getattr(fused_train.optim, name.split("_")[0])
            model = _step_sharded_rounding(params, grads, lambda t: distribute_tensor(t, m, placements),
                                           lambda t: distribute_tensor(t, m, placements), compiled, cls)
            results[name] = [p.detach().full_tensor() for p in model]
        (twin_param,) = _step_sharded_rounding([twin], [[twin_grads]],
                                               lambda t: distribute_tensor(t, mesh, [Shard(1)]),
                                               lambda t: distribute_tensor(t, mesh, [Shard(1)]))
        results["shard1"] = twin_param.detach().full_tensor()
        from fused_train.optim._base import _rounding_offset, _shard_offsets

        results["shard1_range"] = (_rounding_offset(twin_param), twin_param.to_local().numel())
        # FSDP2 over tensor parallelism cuts rows interleaved (_StridedShard): not one run of the whole tensor either
        from torch.distributed.tensor.placement_types import _StridedShard

        strided = distribute_tensor(torch.zeros(8, 3), mesh, [_StridedShard(0, split_factor=2)])
        results["strided_range"] = (_rounding_offset(strided), strided.to_local().numel())
        # Where the optimizer cuts shards itself (placements it knows, read without a graph break under
        # torch.compile), it must place them as DTensor does, uneven and empty shards included.
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        for shape in [(7, 5), (1, 3), (3, 9, 2), (5,)]:
            cases = [(mesh, [Shard(0)]), (mesh, [Shard(len(shape) - 1)]), (mesh, [Replicate()]),
                     (mesh_2d, [Shard(0), Shard(0)]), (mesh_2d_t, [Shard(0), Shard(0)]),
                     (mesh_2d_t, [Replicate(), Shard(-1)]), (mesh_2d, [Shard(-1), Shard(0)])]
            for m, placements in cases:
                t = distribute_tensor(torch.zeros(shape), m, placements)
                _, want = compute_local_shape_and_global_offset(shape, m, t.placements)
                assert _shard_offsets(t) == list(want), (shape, placements, _shard_offsets(t), want)
        dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# (name: the optimizer class, then what varies; the mesh; the placements (R: Replicate, Sd: Shard(d)); whether the
# step is compiled, fullgraph).
# The 8-bit optimizers keep full-precision state for DTensor params, stepped by the fp32 ops with the offsets.
_SHARDED_CASES = [
    ("AdamW_shard0", "1d", "S0", False),
    ("AdamW_replicate", "1d", "R", False),
    ("AdamW_shard0_compiled", "1d", "S0", True),
    ("AdamW_hsdp", "2d_t", "R S0", False),
    ("AdamW_shard0_twice", "2d", "S0 S0", False),
    ("SGD_shard0", "1d", "S0", False),
    ("RMSprop_shard0", "1d", "S0", False),
    ("AdamW8bit_shard0", "1d", "S0", False),
    ("RMSprop8bit_shard0", "1d", "S0", False),
]


@pytest.mark.skipif(TORCH_VERSION < (2, 6), reason="DTensor on CPU over gloo: as FSDP2, from torch 2.6 on")
def test_shards_round_as_their_whole_tensor():
    with tempfile.TemporaryDirectory() as out_dir:
        per_rank = _run_workers(_sharded_rounding_worker, (_free_port(), out_dir), out_dir)
    params, grads, twin, twin_grads = _sharded_rounding_params()
    whole = {}
    for name, *_ in _SHARDED_CASES:
        cls = getattr(fused_train.optim, name.split("_")[0])
        if cls not in whole:
            whole[cls] = _step_sharded_rounding(params, grads, lambda t: t, lambda t: t.clone(), cls=cls)
    for result in per_rank:
        # Dim-0 shards (eager and compiled, of each optimizer that steps them), replicas and HSDP's (Replicate,
        # Shard(0)): bit for bit the single process's result.
        for name, *_ in _SHARDED_CASES:
            for got, want in zip(result[name], whole[getattr(fused_train.optim, name.split("_")[0])]):
                assert torch.equal(got.view(torch.int16), want.detach().view(torch.int16)), name
    # Column shards are not one run of the whole tensor: they draw bits of their own, but not each other's. Equal
    # halves with equal gradients would come out equal if both drew the same bits; they must not, and each element
    # must still be one of the two bf16 neighbours of the exact (fp32) result of the step.
    got = per_rank[0]["shard1"]
    assert not torch.equal(got[:, :40].view(torch.int16), got[:, 40:].view(torch.int16))
    (exact,) = _step_sharded_rounding([twin.float()], [[twin_grads.float()]], lambda t: t.clone(),
                                      lambda t: t.clone())
    # and the index ranges the column shards draw from do not overlap (each shard's first element's index times
    # numel: rank 1's starts at 40 · 1280)
    ranges = sorted(result["shard1_range"] for result in per_rank)
    assert ranges[0] == (0, 640) and ranges[1] == (40 * 1280, 640)
    (a, n), (b, m) = sorted(result["strided_range"] for result in per_rank)
    assert n > 0 and m > 0 and a + n <= b and b % 24 == 0  # disjoint, from first·numel
    toward_zero = (exact.detach().view(torch.int32) & -65536).view(torch.float32)
    away = ((exact.detach().view(torch.int32) & -65536) + 65536).view(torch.float32)
    assert torch.all((got.float() == toward_zero) | (got.float() == away))


# DDP averages the two ranks' gradients; the single process takes the mean over the whole batch. The two
# differ only in summation order, a few fp32 ulps.
DIST_TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scenario", [
    "ddp", "zero", "ddp_linear_cross_entropy", "ddp_bf16_stochastic_round",
    pytest.param("fsdp2", marks=pytest.mark.skipif(
        TORCH_VERSION < (2, 6), reason="FSDP2 runs on CPU from torch 2.6 on (torch 2.5's needs CUDA streams)")),
    pytest.param("fsdp2_bf16_stochastic_round", marks=pytest.mark.skipif(
        TORCH_VERSION < (2, 6), reason="FSDP2 runs on CPU from torch 2.6 on (torch 2.5's needs CUDA streams)")),
    pytest.param("fsdp2_adamw8bit", marks=pytest.mark.skipif(
        TORCH_VERSION < (2, 6), reason="FSDP2 runs on CPU from torch 2.6 on (torch 2.5's needs CUDA streams)")),
])
def test_distributed_training_matches_single_process(scenario):
    per_rank = _run(scenario)
    for a, b in zip(*per_rank):
        assert torch.equal(a, b), f"{scenario}: ranks disagree"
    # bf16 with stochastic rounding: DDP (FSDP2's reduce-scatter) averages the bf16 gradients in bf16, the single
    # process sums them in one backward, so they differ at bf16 precision; where the update moves across a rounding
    # threshold, an element lands one bf16 step away (at most 2^-7 relative) — at most one such step per optimizer
    # step.
    # AdamW8bit: where those summation orders put a moment on either side of a midpoint between two codes, it takes
    # the neighbouring code (in the top decade, 1/64 of its block's absmax away), and the element's update moves by up
    # to about 2^-5 of lr in that step; every other element agrees as the fp32 optimizers' do.
    tol = dict(rtol=STEPS * 2.0 ** -7, atol=1e-3) if scenario.endswith("bf16_stochastic_round") else DIST_TOL
    for got, want in zip(per_rank[0], _single_process_reference(scenario)):
        if scenario.endswith("adamw8bit"):
            close = torch.isclose(got, want, **DIST_TOL)
            assert close.float().mean() > 0.99, f"{scenario}: {(~close).sum()} of {close.numel()} elements differ"
            tol = dict(rtol=0, atol=STEPS * 1e-2 * 2.0 ** -5)
        torch.testing.assert_close(got, want, **tol)


# -- 8-bit state of DTensor params (FSDP2's) ------------------------------------------------------------------------
# Each param is given whole on every rank, with its gradients, as above. Rows of 256 elements or more (each cut into
# blocks of its own) cut along dim 0 hold whole blocks: those params keep 8-bit state, each rank its own blocks, and
# the sharded run must end bit for bit where one process ends, params and state alike (the state's full_tensor() is
# the single process's state).
# Shapes: uneven rows (17 and 16), a rank with an empty shard, 3-D, rows that are not whole blocks of 256 (300 =
# 256 + 44; 576 = 256 + 256 + 64, uneven: 4 and 3); the 1-D (4096,) would have blocks cut by a dim-0 sharding, so it
# keeps fp32 state there, and 8-bit state where replicated.
_8BIT_SHAPES = [(33, 256), (1, 512), (5, 2, 128), (6, 300), (7, 576), (4096,)]
_8BIT_BY_ROWS = [True, True, True, True, True, False]
_8BIT_KWARGS = {"AdamW8bit": dict(lr=1e-2, weight_decay=0.1), "SGD8bit": dict(lr=1e-2, momentum=0.9),
                "RMSprop8bit": dict(lr=1e-3, momentum=0.5)}
# (name: optimizer, dtype (bf16: stochastic rounding, the shards' offsets), the placements; the mesh; compiled)
_8BIT_CASES = [(f"{opt}_{dtype}_S0", "1d", "S0", False) for opt in _8BIT_KWARGS for dtype in ("fp32", "bf16")] + [
    ("AdamW8bit_bf16_R", "1d", "R", False),
    ("AdamW8bit_bf16_hsdp", "2d_t", "R S0", False),
    ("AdamW8bit_fp32_S0S0", "2d", "S0 S0", False),
    ("AdamW8bit_bf16_S0compiled", "1d", "S0", True),
]


def _8bit_inputs(dtype, shapes=_8BIT_SHAPES):
    g = torch.Generator().manual_seed(23)
    params = [torch.randn(shape, generator=g).to(dtype) for shape in shapes]
    grads = [[torch.randn(shape, generator=g).to(dtype) for shape in shapes] for _ in range(STEPS)]
    return params, grads


def _8bit_quantized(spec):
    """Which of _8BIT_SHAPES keep 8-bit state under the placements of spec (all, where only replicated)."""
    return [True] * len(_8BIT_SHAPES) if "S0" not in spec else list(_8BIT_BY_ROWS)


def _take_steps(model, grads, step, make=lambda t: t):
    """One step() per entry of grads, each param's gradient made by `make` (a DTensor's placing) from a copy."""
    for step_grads in grads:
        for p, grad in zip(model, step_grads):
            p.grad = make(grad.clone())
        step()


def _step_8bit(name, spec, make=lambda t: t, compiled=False, shapes=_8BIT_SHAPES, quantized=None):
    """Steps `shapes` with the optimizer of case `name`, each param made by `make` (a DTensor's placing), in groups
    of one param: the params the case's placements keep in fp32 (those not `quantized`, by default
    _8bit_quantized(spec)) get a min_8bit_size above their size, so that one process keeps the same state as the
    sharded run."""
    opt_name, dtype, _ = name.split("_")
    dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    params, grads = _8bit_inputs(dtype, shapes)
    model = [torch.nn.Parameter(make(p.clone())) for p in params]
    groups = [dict(params=[p], min_8bit_size=0 if quantized else 1 << 30)
              for p, quantized in zip(model, quantized or _8bit_quantized(spec))]
    opt = getattr(fused_train.optim, opt_name)(groups, **_8BIT_KWARGS[opt_name],
                                               bf16_stochastic_round=dtype == torch.bfloat16)
    step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
    _take_steps(model, grads, step, make)
    return model, opt


def _whole(t):
    # (contiguous: torch 2.11 gathers a tensor cut twice along dim 1 into a non-contiguous one)
    return t.full_tensor().contiguous() if hasattr(t, "full_tensor") else t


def _8bit_result(model, opt):
    return {"params": [_whole(p.detach()) for p in model],
            "state": [{k: _whole(v) for k, v in opt.state[p].items()} for p in model]}


def _sharded_8bit_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        meshes = {"1d": init_device_mesh("cpu", (WORLD,)),
                  "2d": init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("a", "b")),
                  "2d_t": init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("c", "d"))}
        results = {}
        for name, on, spec, compiled in _8BIT_CASES:
            placements = [Replicate() if p == "R" else Shard(int(p[1:])) for p in spec.split()]
            # (min_8bit_size 0 for every param: the placements alone decide which keep 8-bit state; one process,
            # given _8bit_quantized(spec), must end with the same state. Not in the run whose checkpoint one
            # process loads: the checkpoint carries the groups' min_8bit_size, one process's)
            quantized = None if name == "AdamW8bit_fp32_S0" else [True] * len(_8BIT_SHAPES)
            model, opt = _step_8bit(name, spec, lambda t: distribute_tensor(t, meshes[on], placements), compiled,
                                    quantized=quantized)
            results[name] = _8bit_result(model, opt)
            results[name]["local"] = [{k: type(v).__name__ for k, v in opt.state[p].items()} for p in model]
            results[name]["local_bytes"] = sum(
                v.to_local().numel() * v.element_size() for p in model[:5] for k, v in opt.state[p].items()
                if k.endswith(("_codes", "_absmax")))
            if name == "AdamW8bit_fp32_S0":
                # saved with torch.distributed.checkpoint from the 2 ranks; the test loads it into one process
                _dcp_save_optimizer(model, opt, os.path.join(out_dir, "dcp8"))
        # Checkpoints across the precisions, on shards: an fp32 AdamW's state loads into AdamW8bit by quantizing each
        # shard, and an AdamW8bit's into AdamW by dequantizing; both then step on.
        mesh = meshes["1d"]
        for source, target in (("AdamW", "AdamW8bit"), ("AdamW8bit", "AdamW")):
            results[f"{source}_to_{target}"] = _8bit_reload(
                source, target, lambda t: distribute_tensor(t, mesh, [Shard(0)]))
        # A sharded checkpoint of fp32 moments (an fp32 AdamW's, or an AdamW8bit's of shards from before they kept
        # 8-bit state: the same keys) resumed by AdamW8bit through DCP, as the README says: built with min_8bit_size
        # above every param's size, loaded, the groups' min_8bit_size set back; then it steps as a load_state_dict.
        results["AdamW_dcp_to_AdamW8bit"] = _8bit_reload(
            "AdamW", "AdamW8bit", lambda t: distribute_tensor(t, mesh, [Shard(0)]),
            dcp_dir=os.path.join(out_dir, "dcp_fp32"))
        # State cut otherwise than its param is refused, naming it, before any param steps
        model = [torch.nn.Parameter(distribute_tensor(torch.randn(8, 256), mesh, [Shard(0)])) for _ in range(2)]
        opt = fused_train.optim.AdamW8bit([dict(params=[p]) for p in model], lr=1e-2, min_8bit_size=0)
        for p in model:
            p.grad = distribute_tensor(torch.ones(8, 256), mesh, [Shard(0)])
        opt.step()
        before = [p.detach().to_local().clone() for p in model]
        state = opt.state[model[1]]
        state["exp_avg_codes"] = state["exp_avg_codes"].redistribute(mesh, [Replicate()])
        try:
            opt.step()
            results["misplaced"] = "stepped"
        except ValueError as e:
            results["misplaced"] = str(e)
        results["misplaced_untouched"] = all(torch.equal(p.detach().to_local(), b) for p, b in zip(model, before))
        # One process's whole checkpoint (torch's full_state_dict) into shards: fp32 moments, and 8-bit ones
        for source in ("AdamW", "AdamW8bit"):
            results[f"{source}_full_into_shards"] = _full_into_shards(
                source, lambda t: distribute_tensor(t, mesh, [Shard(0)]))
        # and one saved before rows had blocks of their own: (6, 300) and (7, 576) requantized by rows on load
        results["flat_full_into_shards"] = _full_into_shards(
            "AdamW8bit", lambda t: distribute_tensor(t, mesh, [Shard(0)]), saved_flat=True)
        dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _8bit_reload(source, target, make=lambda t: t, dcp_dir=None):
    """Steps the row-aligned params twice with `source`, loads its state_dict into `target`, steps twice more. With
    dcp_dir, through torch.distributed.checkpoint into a `target` built with min_8bit_size above every size, from
    an AdamW8bit that kept fp32 moments (as every shard did before 2026-11-29; its steps are fp32 AdamW's)."""
    params, grads = _8bit_inputs(torch.float32)
    params, grads = params[:3], [g[:3] for g in grads]
    model = [torch.nn.Parameter(make(p.clone())) for p in params]
    if dcp_dir is None:
        first = getattr(fused_train.optim, source)(model, lr=1e-2,
                                                   **({"min_8bit_size": 0} if "8bit" in source else {}))
    else:
        first = fused_train.optim.AdamW8bit(model, lr=1e-2, min_8bit_size=1 << 30)
    _take_steps(model, grads[:2], first.step, make)
    if dcp_dir is None:
        second = getattr(fused_train.optim, target)(model, lr=1e-2,
                                                    **({"min_8bit_size": 0} if "8bit" in target else {}))
        second.load_state_dict(first.state_dict())
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        holder = torch.nn.ParameterList(model)
        dcp.save({"optim": get_optimizer_state_dict(holder, first)}, checkpoint_id=dcp_dir)
        for p in model:
            p.grad = None  # (a resumed run: torch's loader makes the fresh state by a step of its own only then)
        second = getattr(fused_train.optim, target)(model, lr=1e-2, min_8bit_size=1 << 30)
        loaded = {"optim": get_optimizer_state_dict(holder, second)}
        dcp.load(loaded, checkpoint_id=dcp_dir)
        set_optimizer_state_dict(holder, second, loaded["optim"])
        for group in second.param_groups:
            group["min_8bit_size"] = 0
    _take_steps(model, grads[2:], second.step, make)
    return _8bit_result(model, second)


def _as_flat_checkpoint(state_dict):
    """The optimizer state dict as fused_train saved it before rows had blocks of their own: every 8-bit moment
    quantized in blocks of the flat param (a 1-D absmax)."""
    from fused_train.optim import _quantization as Q

    for state in state_dict["state"].values():
        for name, signed in Q.MOMENT_IS_SIGNED.items():
            if f"{name}_absmax" in state:
                values = Q.dequantize_blockwise(state[f"{name}_codes"], state[f"{name}_absmax"], signed=signed)
                state[f"{name}_codes"], state[f"{name}_absmax"] = Q.quantize_blockwise(values, signed=signed)
    return state_dict


def _full_into_shards(source, make=None, shapes=_8BIT_SHAPES, kept_8bit=_8BIT_BY_ROWS, saved_flat=False):
    """One process steps all `shapes` twice with `source` (8-bit: min_8bit_size 0, so all are quantized); its whole
    state loads into AdamW8bit over the params placed by `make` through torch's
    set_optimizer_state_dict(full_state_dict=True) (make None: one process, optimizer.load_state_dict), which steps
    twice more. Sharded, the 8-bit state of the params whose blocks the cut would split (those not `kept_8bit`)
    arrives whole and is dequantized into each rank's part of an fp32 moment; one process drops them to fp32 by
    min_8bit_size. saved_flat: the whole state as saved before rows had blocks of their own (_as_flat_checkpoint)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    params, grads = _8bit_inputs(torch.float32, shapes)
    first_model = [torch.nn.Parameter(p.clone()) for p in params]
    # (the fp32 source's groups carry the min_8bit_size one process needs to keep the same params fp32 as the shards)
    first = getattr(fused_train.optim, source)(
        [dict(params=[p]) if "8bit" in source else dict(params=[p], min_8bit_size=0 if aligned else 1 << 30)
         for p, aligned in zip(first_model, kept_8bit)], lr=1e-2,
        **({"min_8bit_size": 0} if "8bit" in source else {}))
    _take_steps(first_model, grads[:2], first.step)
    place = make or (lambda t: t)
    model = [torch.nn.Parameter(place(p.detach().clone())) for p in first_model]
    # (built with the default min_8bit_size, 4096: its fresh state keeps the params under 4096 elements in fp32 where
    # the 8-bit checkpoint has codes. torch's full_state_dict loading merges the state of a zero step of the fresh
    # optimizer into what it loads, so those arrive in both forms: the checkpoint's must win.)
    second = fused_train.optim.AdamW8bit([dict(params=[p]) for p in model], lr=1e-2)
    convert = _as_flat_checkpoint if saved_flat else (lambda state_dict: state_dict)
    if make is None:
        second.load_state_dict(convert(first.state_dict()))
    else:
        whole = StateDictOptions(full_state_dict=True)
        saved = convert(get_optimizer_state_dict(torch.nn.ParameterList(first_model), first, options=whole))
        set_optimizer_state_dict(torch.nn.ParameterList(model), second, saved, options=whole)
    for group, aligned in zip(second.param_groups, kept_8bit):
        group["min_8bit_size"] = 0 if aligned else 1 << 30
    _take_steps(model, grads[2:], second.step, place)
    return _8bit_result(model, second)


def _assert_same_8bit_result(got, want, what):
    for a, b in zip(got["params"], want["params"]):
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), f"{what}: params differ"
    for i, (a, b) in enumerate(zip(got["state"], want["state"])):
        assert sorted(a) == sorted(b), f"{what}: param {i} has state {sorted(a)}, one process {sorted(b)}"
        for key in b:
            assert a[key].shape == b[key].shape and torch.equal(a[key], b[key]), f"{what}: param {i} '{key}' differs"


@pytest.mark.skipif(TORCH_VERSION < (2, 6), reason="DTensor on CPU over gloo: as FSDP2, from torch 2.6 on")
def test_8bit_state_of_shards_is_the_whole_tensors():
    with tempfile.TemporaryDirectory() as out_dir:
        per_rank = _run_workers(_sharded_8bit_worker, (_free_port(), out_dir), out_dir)
        for name, _, spec, _ in _8BIT_CASES:
            want = _8bit_result(*_step_8bit(name, spec))
            kinds = [("exp_avg_codes" if name.startswith("Adam") else
                      "momentum_buffer_codes" if name.startswith("SGD") else "square_avg_codes") in state
                     for state in want["state"]]
            assert kinds == _8bit_quantized(spec), name
            for rank, result in enumerate(per_rank):
                _assert_same_8bit_result(result[name], want, f"{name}, rank {rank}")
                # the state is DTensors (each rank holding its own blocks), none of it gathered
                for local in result[name]["local"]:
                    assert all(kind == "DTensor" for key, kind in local.items() if key not in ("step", "rounding_seed")
                               ), (name, local)
            if "S0" in spec and "R" not in spec:
                # the five params kept by rows: a code per element and an absmax per block of a row, each rank
                # holding its rows' (a row of 300: 2 blocks, of 576: 3), none twice
                moments = 2 if name.startswith(("Adam", "RMSprop")) else 1
                shapes = _8BIT_SHAPES[:5]
                codes = sum(math.prod(s) for s in shapes)
                blocks = sum(s[0] * -(-math.prod(s[1:]) // 256) for s in shapes)
                assert sum(r[name]["local_bytes"] for r in per_rank) == moments * (codes + 4 * blocks), name
        for source, target in (("AdamW", "AdamW8bit"), ("AdamW8bit", "AdamW")):
            want = _8bit_reload(source, target)
            for rank, result in enumerate(per_rank):
                _assert_same_8bit_result(result[f"{source}_to_{target}"], want, f"{source} to {target}, rank {rank}")
        want = _8bit_reload("AdamW", "AdamW8bit")
        for rank, result in enumerate(per_rank):
            _assert_same_8bit_result(result["AdamW_dcp_to_AdamW8bit"], want, f"AdamW's DCP into AdamW8bit, rank {rank}")
        for result in per_rank:
            assert "state 'exp_avg_codes' must be cut as its param" in result["misplaced"], result["misplaced"]
            assert result["misplaced_untouched"]
        for source in ("AdamW", "AdamW8bit"):
            want = _full_into_shards(source)
            for rank, result in enumerate(per_rank):
                _assert_same_8bit_result(result[f"{source}_full_into_shards"], want,
                                         f"{source}'s whole state into shards, rank {rank}")
        want = _full_into_shards("AdamW8bit", saved_flat=True)
        never_flat = _full_into_shards("AdamW8bit")
        # ((6, 300)'s state requantized by rows: not the state that was never flat)
        assert not torch.equal(want["state"][3]["exp_avg_codes"], never_flat["state"][3]["exp_avg_codes"])
        for rank, result in enumerate(per_rank):
            _assert_same_8bit_result(result["flat_full_into_shards"], want, f"a flat whole state into shards, {rank}")
        # The checkpoint the 2 ranks saved loads into one process (torch.distributed.checkpoint reshards it): the
        # very state one process has after the same steps.
        _assert_dcp_loads_into_one_process(os.path.join(out_dir, "dcp8"), *_step_8bit("AdamW8bit_fp32_S0", "S0"),
                                           "DCP 2 -> 1")


def _dcp_save_optimizer(model, opt, checkpoint_id):
    """Saves the state of `opt` over the params `model` with torch.distributed.checkpoint (each rank its shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optim": get_optimizer_state_dict(torch.nn.ParameterList(model), opt)}, checkpoint_id=checkpoint_id)


def _assert_dcp_loads_into_one_process(checkpoint_id, model, want_opt, what):
    """The AdamW8bit checkpoint the ranks saved (_dcp_save_optimizer) loads into one process's AdamW8bit, built with
    `want_opt`'s groups over copies of `model`, as the very state `want_opt` has after the same steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in model]
    holder = torch.nn.ParameterList(fresh_params)
    groups = [dict(params=[p], min_8bit_size=g["min_8bit_size"]) for p, g in zip(fresh_params,
                                                                               want_opt.param_groups)]
    fresh = fused_train.optim.AdamW8bit(groups, **_8BIT_KWARGS["AdamW8bit"])
    loaded = {"optim": get_optimizer_state_dict(holder, fresh)}
    dcp.load(loaded, checkpoint_id=checkpoint_id)
    set_optimizer_state_dict(holder, fresh, loaded["optim"])
    _assert_same_8bit_result(_8bit_result(fresh_params, fresh), _8bit_result(model, want_opt), what)


# -- 8-bit state of tensor-parallel shards: 4 ranks, a 2 x 2 mesh ("dp", "tp") ------------------------------------
# Tensor parallelism cuts a row-wise Linear's weight along dim 1 (Shard(1)); FSDP2 over it adds a dim-0 cut
# (Shard(0), Shard(1)), and over a column-wise weight cuts its rows interleaved (_StridedShard(0), Shard(0)). Where
# each rank's part of every row is whole blocks of 256, and the absmax's columns cut alike are those blocks, the param
# keeps 8-bit state, its absmax placed as itself; the run must then end bit for bit where one process ends.
_TP_WORLD = 4
_TP_SHAPES = [(9, 1024), (3, 512), (5, 768), (2, 3, 256), (1, 2048), (6, 300), (2, 3, 512), (3, 7, 128)]
# Which keep 8-bit state under each case's placements (worked out by hand). Along dim 1: 768 columns cut in 2 are
# 384; 512 cut in 2 and 2 again are 128; (2, 3, 512)'s 3 indices of 2 blocks cut in 2 are 2 and 1 (4 and 2 blocks),
# its absmax's 6 columns 3 and 3; (6, 300)'s 300 columns (blocks of 256 and 44) cut in 2 are 150. (3, 7, 128)'s rows
# of 896 (Qwen2.5-0.5B's width: blocks of 256, 256, 256, 128) cut in 2 are indices 4 and 3, elements [0, 512) and
# [512, 896), the absmax's 4 columns 2 and 2: whole blocks, and cut in 2 again, 256, 256, 256 and 128.
_TP_CASES = {
    "S0 S1": [True, True, False, True, True, False, False, True],
    "S1 S1": [True, False, False, True, True, False, False, True],
    "SS0 S0": [True, True, True, True, True, True, True, True],
    "R S1": [True, True, False, True, True, False, False, True],
}


def _tp_placements(spec):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    return [Replicate() if p == "R" else _StridedShard(0, split_factor=2) if p == "SS0" else Shard(int(p[1:]))
            for p in spec.split()]


def _tp_8bit_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=_TP_WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, distribute_tensor

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        results = {}
        for spec in _TP_CASES:
            placements = _tp_placements(spec)

            def make(t, placements=placements):
                if not spec.startswith("SS0"):
                    return distribute_tensor(t, mesh, placements)
                # as FSDP2 cuts a column-wise weight's rows over tensor parallelism's (distribute_tensor refuses
                # uneven _StridedShard cuts): the "tp" rank's chunk of rows, then the "dp" rank's chunk of that
                dp, tp = mesh.get_coordinate()
                part = t
                for i in (tp, dp):
                    size = -(-part.shape[0] // 2)
                    part = part[min(part.shape[0], size * i):size * (i + 1)]
                return DTensor.from_local(part.contiguous(), mesh, placements, run_check=False, shape=t.shape,
                                          stride=t.stride())

            # whether this rank's part of each param is whole blocks: a block-number tensor (each row's blocks of
            # 256, the last one shorter) cut as the param holds every element of each block it holds
            whole_blocks = []
            for shape in _TP_SHAPES:
                rows, row = shape[0], math.prod(shape[1:])
                blocks = (torch.arange(rows)[:, None] * -(-row // 256) + torch.arange(row) // 256).reshape(shape)
                local = make(blocks).to_local().reshape(-1)
                held = local.unique()
                whole_blocks.append(torch.equal(torch.bincount(local, minlength=blocks.numel())[held],
                                                torch.bincount(blocks.reshape(-1))[held]))
            for opt_name in ("AdamW8bit", "SGD8bit"):
                name = f"{opt_name}_fp32_{spec.replace(' ', '')}"
                compiled = opt_name == "AdamW8bit" and spec == "S0 S1"  # (the step compiled, as one graph)
                # (min_8bit_size 0 for every param: the placements alone decide; one process keeps _TP_CASES's.
                # Not in the run whose checkpoint one process loads: it carries one process's min_8bit_size)
                saved = name == "AdamW8bit_fp32_S0S1"
                model, opt = _step_8bit(name, spec, make, compiled, shapes=_TP_SHAPES,
                                        quantized=_TP_CASES[spec] if saved else [True] * len(_TP_SHAPES))
                result = results[name] = _8bit_result(model, opt)
                result["placements"] = [repr(tuple(p.placements)) for p in model]
                result["whole_blocks"] = whole_blocks
                result["local"] = [{k: type(v).__name__ for k, v in opt.state[p].items()} for p in model]
                result["local_bytes"] = [sum(v.to_local().numel() * v.element_size() for k, v in opt.state[p].items()
                                             if k.endswith(("_codes", "_absmax"))) for p in model]
                if saved:  # (the test loads this into one process)
                    _dcp_save_optimizer(model, opt, os.path.join(out_dir, "dcp_tp"))
            # One process's whole 8-bit state (torch's full_state_dict) into these shards (not into uneven
            # _StridedShard ones: torch's loader cuts those with distribute_tensor, which refuses them)
            if not spec.startswith("SS0"):
                results[f"full_into_{spec}"] = _full_into_shards("AdamW8bit", make, _TP_SHAPES, _TP_CASES[spec])
        results["fsdp2_over_tp"] = _fsdp2_over_tp(mesh)
        dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _tp_model() -> torch.nn.Module:
    """A column-wise and a row-wise Linear, as a transformer's MLP is cut by tensor parallelism."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 768))


def _tp_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 256, generator=g), torch.randn(8, 768, generator=g)


def _train_tp_model(model, step_inputs=lambda x, y: (x, y)):
    opt = fused_train.optim.AdamW8bit(model.parameters(), lr=1e-2)
    for step in range(STEPS):
        x, y = step_inputs(*_tp_batch(step))
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return opt


def _fsdp2_over_tp(mesh):
    """torchtitan's layout: the model cut by tensor parallelism over "tp" (ColwiseParallel: weight Shard(0);
    RowwiseParallel: weight Shard(1)), then FSDP2 over "dp", each "dp" rank training on its half of the batch. Returns
    the params and the state's placements."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = _tp_model()
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    dp = mesh.get_coordinate()[0]
    opt = _train_tp_model(model, lambda x, y: (x.chunk(2)[dp], y.chunk(2)[dp]))
    return {"params": [p.detach().full_tensor() for p in model.parameters()],
            "placements": [repr(tuple(p.placements)) for p in model.parameters()],
            "state": [{k: repr(tuple(v.placements)) for k, v in opt.state[p].items() if k != "step"}
                      for p in model.parameters()]}


@pytest.mark.skipif(TORCH_VERSION < (2, 6), reason="DTensor on CPU over gloo: as FSDP2, from torch 2.6 on")
def test_8bit_state_of_tensor_parallel_shards_is_the_whole_tensors():
    with tempfile.TemporaryDirectory() as out_dir:
        per_rank = _run_workers(_tp_8bit_worker, (_free_port(), out_dir), out_dir, world=_TP_WORLD)
        for spec, kept in _TP_CASES.items():
            for opt_name in ("AdamW8bit", "SGD8bit"):
                name = f"{opt_name}_fp32_{spec.replace(' ', '')}"
                model, opt = _step_8bit(name, spec, shapes=_TP_SHAPES, quantized=kept)
                want = _8bit_result(model, opt)
                first = "exp_avg" if opt_name == "AdamW8bit" else "momentum_buffer"
                for rank, results in enumerate(per_rank):
                    what, result = f"{name}, rank {rank}", results[name]
                    assert [f"{first}_codes" in state for state in result["state"]] == kept, what
                    # never 8-bit where a rank would hold part of a block
                    assert all(whole for whole, k in zip(result["whole_blocks"], kept) if k), (what, result)
                    _assert_same_8bit_result(result, want, what)
                    for local in result["local"]:  # each rank holds its own part of the state, none gathered
                        assert all(kind == "DTensor" for key, kind in local.items() if key != "step"), (what, local)
                    assert "_StridedShard" in result["placements"][0] if spec.startswith("SS0") else True
                # The ranks' 8-bit state adds up to the whole tensor's once per replica: a byte per element and 4 per
                # block of a row, per moment
                moments = 2 if opt_name == "AdamW8bit" else 1
                replicas = 2 if spec.startswith("R") else 1
                for i, (shape, k) in enumerate(zip(_TP_SHAPES, kept)):
                    if k:
                        total = sum(results[name]["local_bytes"][i] for results in per_rank)
                        numel, blocks = math.prod(shape), shape[0] * -(-math.prod(shape[1:]) // 256)
                        assert total == replicas * moments * (numel + 4 * blocks), (name, shape)
            if not spec.startswith("SS0"):  # (see _tp_8bit_worker)
                want = _full_into_shards("AdamW8bit", None, _TP_SHAPES, kept)
                for rank, result in enumerate(per_rank):
                    _assert_same_8bit_result(result[f"full_into_{spec}"], want, f"whole state into {spec}, rank {rank}")
        # The checkpoint the 4 ranks saved (Shard(0), Shard(1)) loads into one process: the same state
        _assert_dcp_loads_into_one_process(
            os.path.join(out_dir, "dcp_tp"),
            *_step_8bit("AdamW8bit_fp32_S0S1", "S0 S1", shapes=_TP_SHAPES, quantized=_TP_CASES["S0 S1"]), "DCP 4 -> 1")
        # A model under FSDP2 over tensor parallelism trains as in one process; both weights keep 8-bit state, placed as
        # themselves (the biases, under min_8bit_size, fp32)
        model = _tp_model()
        _train_tp_model(model)
        for rank, results in enumerate(per_rank):
            run = results["fsdp2_over_tp"]
            assert "_StridedShard" in run["placements"][0] and "Shard(dim=1)" in run["placements"][2], run
            for i, state in enumerate(run["state"]):
                assert sorted(state) == (["exp_avg_absmax", "exp_avg_codes", "exp_avg_sq_absmax", "exp_avg_sq_codes"]
                                         if i in (0, 2) else ["exp_avg", "exp_avg_sq"]), (rank, i, state)
                assert set(state.values()) == {run["placements"][i]}, (rank, i, state)
            # (tensor parallelism sums the row-wise layer's products in another order than one process: as for
            # fsdp2_adamw8bit in test_distributed_training_matches_single_process, a moment on a midpoint between
            # two codes may take the other one)
            for got, want in zip(run["params"], model.parameters()):
                close = torch.isclose(got, want.detach(), **DIST_TOL)
                assert close.float().mean() > 0.99, f"rank {rank}: {(~close).sum()} of {close.numel()} differ"
                torch.testing.assert_close(got, want.detach(), rtol=0, atol=STEPS * 1e-2 * 2.0 ** -5)


def test_cuts_on_block_edges_agrees_with_chunking_an_index_tensor():
    """_cuts_on_block_edges against DTensor's cuts done by hand: a row of `size` indices of `stride` elements, cut by
    torch.chunk (empty pieces where it returns fewer) into chunks[0] pieces, each into chunks[1], ...; True exactly
    where every piece is whole blocks (of 256, a row's last one shorter) and the absmax's columns cut alike are those
    blocks."""
    from fused_train.optim._state8bit import _cuts_on_block_edges

    def pieces(n, chunks):
        ranges = [(0, n)]
        for count in chunks:
            cut = []
            for start, stop in ranges:
                parts = list(torch.arange(start, stop).chunk(count)) if stop > start else []
                cut += [(int(p[0]), int(p[-1]) + 1) if p.numel() else (stop, stop) for p in parts]
                cut += [(stop, stop)] * (count - len(parts))
            ranges = cut
        return ranges

    verdicts = set()
    for size in range(1, 13):
        for stride in (1, 32, 64, 96, 100, 128, 150, 256, 300, 320, 512, 576, 768):
            row = size * stride
            if row < 256:  # (rows under 256 elements have no blocks of their own)
                continue
            blocks = -(-row // 256)  # the last one shorter where row is not a multiple of 256
            for chunks in ([2], [3], [4], [2, 2], [2, 3], [3, 2, 2]):
                param = [(a * stride, b * stride) for a, b in pieces(size, chunks)]
                absmax = [(min(a * 256, row), min(b * 256, row)) for a, b in pieces(blocks, chunks)]
                want = param == absmax
                verdicts.add((want, row % 256 == 0))
                assert _cuts_on_block_edges(size, stride, blocks, chunks) == want, (size, stride, chunks)
    assert verdicts == {(True, True), (False, True), (True, False), (False, False)}
