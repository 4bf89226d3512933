"""A whole training step (forward, loss, backward, fused step) captured in a CUDA graph and replayed, against
the same steps run eagerly; graphs captured and destroyed by the ten thousand; the first loss call of a process
inside a capture; and NCCL with world size 1. GPU only: skipped with the reason elsewhere."""

import copy
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_train

from conftest import TOL, cuda_only, warm_up_and_capture


@cuda_only
@pytest.mark.parametrize("loss", ["torch", "fused_train"])
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop"])
def test_captured_training_step_replays_like_eager(name, loss):
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
    loss_fn = torch.nn.CrossEntropyLoss() if loss == "torch" else fused_train.nn.CrossEntropyLoss()
    batches = [(torch.randn(16, 32, device=device), torch.randint(0, 8, (16,), device=device)) for _ in range(6)]
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()

    def step(m, o, x, y):
        loss_fn(m(x), y).backward()
        o.step()
        o.zero_grad(set_to_none=False)  # grads stay allocated at fixed addresses, zeroed by the step kernel

    graph = warm_up_and_capture(lambda: step(model, opt, static_x, static_y), batches[:3], static_x, static_y)
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
def test_step_graphs_captured_and_destroyed_65537_times_hold_nothing():
    """Each captured optimizer launch used to keep one of 65536 step-counter slots for the life of the process,
    so re-recording graphs (torch.compile's reduce-overhead on new shapes) failed after a few thousand."""
    p = torch.zeros(4, device="cuda")
    g = torch.ones(4, device="cuda")
    exp_avg, exp_avg_sq = torch.zeros_like(p), torch.zeros_like(p)
    step = torch.zeros((), device="cuda")
    lr = torch.tensor(0.1, device="cuda")

    def adam_step():
        fused_train._ops.adam_step_([p], [g], [exp_avg], [exp_avg_sq], [], [step], lr=0.0, beta1=0.9, beta2=0.999,
                                    weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
                                    decoupled_weight_decay=False, zero_grad=False, lr_tensor=lr)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        adam_step()  # eager warm-up: step 1
        # One pool for all graphs, kept alive by the first, so each capture reuses its memory.
        pool = torch.cuda.graph_pool_handle()
        keep = torch.cuda.CUDAGraph()
        keep.capture_begin(pool=pool)
        adam_step()
        keep.capture_end()
        for i in range(65537):
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=pool)
            adam_step()
            graph.capture_end()
            if i in (0, 65536):
                graph.replay()  # steps 2 and 3
            del graph
        keep.replay()  # step 4: the first graph still replays after all the others are gone
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert step.item() == 4.0
    # Adam with a constant gradient of 1 moves each param by lr per step (bias-corrected m/sqrt(v) = 1).
    torch.testing.assert_close(p, torch.full_like(p, -0.4), rtol=1e-4, atol=1e-5)


def _run_fresh_process(script):
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert "ok" in done.stdout


@cuda_only
def test_first_loss_call_of_a_process_inside_a_graph_capture():
    """The loss's first call on a device sets up its bad-target report (pinned host memory); inside
    torch.cuda.graph's default global capture mode that setup must neither fail nor break the capture."""
    _run_fresh_process("""
        import torch
        import fused_train
        from fused_train.nn.functional import cross_entropy

        x = torch.randn(64, 1000, device="cuda")
        y = torch.randint(0, 1000, (64,), device="cuda")
        w = torch.rand(1000, device="cuda")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # the first fused_train call of this process
            loss = cross_entropy(x, y, weight=w, label_smoothing=0.1)
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            graph.replay()
            expected = torch.nn.functional.cross_entropy(x, y, weight=w, label_smoothing=0.1)
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        print("ok")
    """)


@cuda_only
def test_first_loss_call_while_another_thread_captures():
    """The same setup on one thread while another thread captures a graph in global mode."""
    _run_fresh_process("""
        import threading
        import torch
        import fused_train
        from fused_train.nn.functional import cross_entropy

        a = torch.randn(256, 256, device="cuda")
        x = torch.randn(64, 1000, device="cuda")
        y = torch.randint(0, 1000, (64,), device="cuda")
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            # Holds a 2 MiB segment of the allocator's small pool for this stream (torch.cuda.graph empties the
            # cache before capturing): the loss's few small outputs then need no cudaMalloc, which torch's
            # allocator would make in global capture mode and so break the other thread's capture.
            keep = torch.empty(256, device="cuda")
        torch.cuda.synchronize()
        capturing, called = threading.Event(), threading.Event()
        result = {}

        def capture():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = a * 2 + 1  # elementwise: a first matmul would create a cuBLAS handle inside the capture
                capturing.set()
                called.wait(timeout=60)
            graph.replay()
            torch.cuda.synchronize()
            result["graph"] = torch.equal(out, a * 2 + 1)

        thread = threading.Thread(target=capture)
        thread.start()
        capturing.wait(timeout=60)
        try:
            with torch.cuda.stream(stream):  # nothing here may wait: the other thread is capturing
                loss = cross_entropy(x, y)  # this process's first fused_train call
        finally:
            called.set()
            thread.join()
        torch.cuda.synchronize()
        torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(x, y), rtol=1e-5, atol=1e-6)
        assert result.get("graph"), result
        del keep
        print("ok")
    """)


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
