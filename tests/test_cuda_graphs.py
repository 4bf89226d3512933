"""A whole training step (forward, loss, backward, fused step) captured in a CUDA graph and replayed, against
the same steps run eagerly; and NCCL with world size 1. GPU only: skipped with the reason elsewhere."""

import copy
import os
import socket

import pytest
import torch

import fused_train

from conftest import TOL, cuda_only


@cuda_only
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop"])
def test_captured_training_step_replays_like_eager(name):
    torch.manual_seed(0)
    device = "cuda"
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).to(device)
    twin = copy.deepcopy(model)
    cfg = dict(momentum=0.9) if name in ("SGD", "RMSprop") else {}
    if name != "SGD":
        cfg["capturable"] = True  # torch's flag; our kernels never sync with the host either way
    # lr on the device, so a replay reads its current value.
    opt = getattr(fused_train.optim, name)(model.parameters(), lr=torch.tensor(0.01, device=device), **cfg)
    twin_opt = getattr(fused_train.optim, name)(twin.parameters(), lr=0.01, **cfg)
    loss_fn = torch.nn.CrossEntropyLoss()
    batches = [(torch.randn(16, 32, device=device), torch.randint(0, 8, (16,), device=device)) for _ in range(6)]
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()

    def step(m, o, x, y):
        loss_fn(m(x), y).backward()
        o.step()
        o.zero_grad(set_to_none=False)  # grads stay allocated at fixed addresses, zeroed by the step kernel

    # Warm up on a side stream (creates state and grads), as torch.cuda.graph's recipe asks.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:3]:
            static_x.copy_(x)
            static_y.copy_(y)
            step(model, opt, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records; nothing runs
        step(model, opt, static_x, static_y)
    for x, y in batches[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()

    for x, y in batches:
        step(twin, twin_opt, x, y)
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    if name != "SGD":
        assert all(float(st["step"]) == 6.0 for st in opt.state.values()), "replays advance the step on device"


@cuda_only
def test_nccl_world_size_one():
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 4).cuda())
        twin = copy.deepcopy(model.module)
        opt = fused_train.optim.Adam(model.parameters(), lr=0.01)
        twin_opt = torch.optim.Adam(twin.parameters(), lr=0.01)
        x = torch.randn(4, 8, device="cuda")
        for m, o in ((model, opt), (twin, twin_opt)):
            m(x).square().mean().backward()
            o.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, **TOL[torch.float32])
    finally:
        dist.destroy_process_group()
