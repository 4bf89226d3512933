"""The benchmarks' bandwidth ceilings: the compiled streaming pass does every read and write of an optimizer's
access pattern, and the copy pass of the segmentation loss's (checked value by value, so the compiler cannot have
dropped any), the bytes counted per pattern are the bytes the step moves, and every row says its share of its own
pattern's ceiling."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    path = BENCHMARKS / "bench_optimizers.py"
    spec = importlib.util.spec_from_file_location("bench_optimizers_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_states", [0, 1, 2, 3])
@pytest.mark.parametrize("zero_grad", [True, False])
def test_streaming_pass_reads_and_writes_every_stream(bench, dtype, n_states, zero_grad):
    streaming_pass = bench.load_streaming_pass()
    assert streaming_pass is not None, "streaming_ceiling.cpp did not build"
    torch.set_num_threads(2)
    # Sizes that put the threads' split inside a tensor and across tensor boundaries, with vector tails.
    sizes = [70001, 3, 1000, 40000, 17]
    params = [torch.randint(0, 100, (n,)).to(dtype) for n in sizes]
    grads = [torch.randint(1, 100, (n,)).to(dtype) for n in sizes]
    states = [torch.randint(0, 100, (n,)).float() for _ in range(n_states) for n in sizes]
    before_p, before_g = [p.clone() for p in params], [g.clone() for g in grads]
    before_s = [s.clone() for s in states]
    repeat = 3
    seconds = streaming_pass(params, grads, states, zero_grad, repeat)
    assert len(seconds) == repeat and all(s > 0 for s in seconds)
    passes_with_grad = 1 if zero_grad else repeat  # a zeroed gradient adds nothing after the first pass
    for i, n in enumerate(sizes):
        if dtype == torch.float32:
            g = before_g[i]
            assert torch.equal(params[i], before_p[i] + passes_with_grad * g)
        else:  # the raw 16 bits, added as integers
            bits = before_p[i].view(torch.int16).to(torch.int32) & 0xFFFF
            g = before_g[i].view(torch.int16).to(torch.int32) & 0xFFFF
            expected = (bits + passes_with_grad * g) & 0xFFFF
            assert torch.equal(params[i].view(torch.int16).to(torch.int32) & 0xFFFF, expected)
            g = g.float()
        for j in range(n_states):
            k = j * len(sizes) + i
            assert torch.equal(states[k], before_s[k] + passes_with_grad * g.float())
        assert torch.equal(grads[i], torch.zeros_like(grads[i]) if zero_grad else before_g[i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_pass_reads_one_stream_and_writes_another(bench, dtype):
    # The segmentation loss's ceiling (bench_segmentation_loss.py): out = in + 1 in the storage type, every
    # element, the threads' split inside the tensor; in untouched.
    assert bench.load_streaming_pass() is not None, "streaming_ceiling.cpp did not build"
    copy_pass = torch.ops.fused_train_bench.copy_pass_
    torch.set_num_threads(2)
    source = torch.randint(0, 100, (100003,)).to(dtype)
    before = source.clone()
    out = torch.zeros_like(source)
    seconds = copy_pass(source, out, 2)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    assert torch.equal(source, before)
    if dtype == torch.float32:
        assert torch.equal(out, before + 1)
    else:  # the raw 16 bits plus one
        bits = before.view(torch.int16).to(torch.int32) & 0xFFFF
        assert torch.equal(out.view(torch.int16).to(torch.int32) & 0xFFFF, (bits + 1) & 0xFFFF)
    with pytest.raises(RuntimeError, match="one dtype and size"):
        copy_pass(source, torch.zeros(7, dtype=dtype), 1)
    with pytest.raises(RuntimeError, match="repeat"):
        copy_pass(source, out, 0)


def test_streaming_pass_refuses_mismatched_lists(bench):
    streaming_pass = bench.load_streaming_pass()
    p = [torch.ones(8)]
    with pytest.raises(RuntimeError, match="grads"):
        streaming_pass(p, [torch.ones(8, dtype=torch.float64)], [], True, 1)
    with pytest.raises(RuntimeError, match="states"):
        streaming_pass(p, [torch.ones(8)], [torch.ones(7)], True, 1)
    with pytest.raises(RuntimeError, match="repeat"):
        streaming_pass(p, [torch.ones(8)], [], True, 0)


def test_bytes_counted_per_access_pattern(bench):
    # Adam fp32: read p, g, m, v and write p, m, v = 28 B; +4 when the grad is written back as zero.
    assert bench.bytes_per_param(torch.float32, 2, False) == 28
    assert bench.bytes_per_param(torch.float32, 2, True) == 32
    # SGD with momentum and RMSprop: one state.
    assert bench.bytes_per_param(torch.float32, 1, False) == 20
    # bf16 params and grads with fp32 state (fused_train's), and with bf16 state (torch's).
    assert bench.bytes_per_param(torch.bfloat16, 2, False) == 22
    assert bench.bytes_per_param(torch.bfloat16, 2, True) == 24
    assert bench.bytes_per_param(torch.bfloat16, 2, False, torch.bfloat16) == 14
    # 16 x 1M fp32 Adam touches 256 MiB (p, g, m, v), past any L3 cache; 2000 x 1k touches 32 MiB.
    assert bench.working_set_mib(torch.float32, 2, 16 << 20) == 256
    assert bench.working_set_mib(torch.float32, 2, 2000 * 1000) == pytest.approx(30.5, abs=0.1)


def test_rows_report_their_share_of_their_own_patterns_ceiling(bench):
    rows = bench.time_case("Adam", "Adam", dict(lr=1e-3), 2, ("fused",), "4 x 64k", 4, 1 << 16, torch.float32,
                           True, "cpu", repeat=2)
    assert [r["impl"] for r in rows] == ["fused_train", "torch fused"]
    for row in rows:
        assert row["ceiling_gbs"] > 0
        assert row["pct_ceiling"] == pytest.approx(100 * row["gbs"] / row["ceiling_gbs"])
        assert row["gbs"] == pytest.approx(32 * 4 * (1 << 16) / (row["ms"] * 1e-3) / 1e9)
    assert rows[0]["ratio_vs_fastest_torch"] == pytest.approx(rows[0]["ms"] / rows[1]["ms"])
    # torch keeps bf16 state for bf16 params: its bytes are fewer, its pattern is not the ceiling's
    bf16 = bench.time_case("Adam", "Adam", dict(lr=1e-3), 2, ("fused",), "4 x 64k", 4, 1 << 16,
                           torch.bfloat16, False, "cpu", repeat=2, threads=1)
    assert bf16[0]["pct_ceiling"] is not None and bf16[1]["pct_ceiling"] is None
    assert bf16[1]["gbs"] == pytest.approx(14 * 4 * (1 << 16) / (bf16[1]["ms"] * 1e-3) / 1e9)
    assert all(r["threads"] == 1 for r in bf16)
    json.dumps(rows + bf16)  # `fused-train bench --json` writes them as they are


def test_full_run_times_adam_over_2000_small_tensors_beside_torch_fused(bench):
    # The per-step host cost shows in this case; it must stay in the table beside torch's fused Adam.
    assert ("2000 x 1k", 2000, 1000) in bench.SHAPES
    adam = next(o for o in bench.OPTIMIZERS if o[0] == "Adam")
    assert "fused" in adam[4]


def test_interleaved_timing_rotates_the_order_and_takes_self_timed_seconds():
    from fused_train.benchmarking import interleaved_ms

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    fns["self_timed"] = lambda: calls.append("self_timed") or 0.25  # reports 250 ms of its own
    times = interleaved_ms(fns, "cpu", warmup=1, repeat=4)
    assert set(times) == set(fns) and times["self_timed"] == pytest.approx(250.0)
    assert all(calls.count(name) == 5 for name in fns)
    rounds = [calls[i:i + 4] for i in range(0, len(calls), 4)]
    assert [r[0] for r in rounds] == ["a", "b", "c", "self_timed", "a"]  # each leads a round in turn
    assert all(sorted(r) == sorted(fns) for r in rounds)


def test_linear_cross_entropy_benchmark_measures_each_implementation_in_its_own_process(tmp_path):
    """benchmarks/bench_linear_cross_entropy.py end to end on a small case: a JSON row per implementation, with
    the memory each adds measured from /proc (the (N, V) logits of linear + cross_entropy, 256 × 4000 fp32 =
    4 MiB, against fused_train's one chunk of 192 rows) and every implementation timed."""
    impls = ["fused", "torch"] + (["chunked"] if hasattr(torch.nn, "LinearCrossEntropyOptions") else [])
    out = tmp_path / "rows.jsonl"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_linear_cross_entropy.py"), "--cases", "256,32,4000", "--dtypes",
         "float32", "--reps", "1", "--impls", *impls, "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    rows = {row["impl"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows) == sorted(impls)
    assert all(row["seconds"] > 0 and row["reps"] == 1 and row["gemm_dtype"] == "float32" for row in rows.values())
    assert rows["torch"]["extra_peak_mib"] >= 3.9  # at least the logits
    assert rows["fused"]["extra_peak_mib"] < rows["torch"]["extra_peak_mib"]
    assert "fused_over_this" in rows["torch"] and "fused/torch" in done.stdout


def test_per_sample_gradients_benchmark_measures_both_kinds_beside_torch(tmp_path):
    """benchmarks/bench_per_sample_gradients.py end to end on a small case: a JSON row per implementation and
    kind of gradient, timed in turns, with the memory each adds measured in a process of its own (torch holds
    the (B, N, V) logits, 4 × 64 × 4000 fp32 = 4 MiB, and their gradient; fused_train one chunk of them)."""
    out = tmp_path / "rows.jsonl"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_per_sample_gradients.py"), "--cases", "4,64,32,4000", "--reps", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((row["impl"], row["grads"]) for row in rows) == [
        ("fused", "all"), ("fused", "input"), ("torch", "all"), ("torch", "input")]
    assert all(row["seconds"] > 0 and row["reps"] >= 1 for row in rows)
    memory = {(row["impl"], row["grads"]): row["extra_peak_mib"] for row in rows}
    assert memory[("torch", "input")] >= 3.9  # at least the logits
    assert memory[("fused", "input")] < memory[("torch", "input")]
    assert all("fused_over_this" in row for row in rows if row["impl"] == "torch")
    assert done.stdout.count("fused/torch") == 2


@pytest.mark.skipif(tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 6),
                    reason="FSDP2 runs on CPU from torch 2.6 on")
@pytest.mark.parametrize("model,tp", [("gpt2", 1), ("tinyllama", 2), ("smollm", 1)])
def test_fsdp2_8bit_benchmark_measures_each_ranks_state_beside_fp32(tmp_path, model, tp):
    """benchmarks/bench_fsdp2_8bit.py end to end on a one-layer GPT-2 over 2 ranks, (tp=2) a one-layer Llama under
    FSDP2 over tensor parallelism on a 2 x 2 mesh, and a one-layer Llama of SmolLM's shapes (rows of 576 elements,
    not whole blocks of 256) over 2 ranks: on each rank AdamW8bit's state is about 2.03 bytes per param of its shards
    (every param but the layer norms' and biases' is 8-bit, the tensor-parallel cuts included), the fp32 optimizers'
    8, and every step is timed."""
    pytest.importorskip("transformers")
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_fsdp2_8bit.py"), "--model", model, "--layers", "1", "--vocab", "1024",
         "--rounds", "1", "--tp", str(tp), "--without-torchao", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["per_rank"]) == 2 * tp
    if tp > 1:  # the Llama's projections are cut by both mesh dims
        placements = " ".join(result["placements"])
        assert "Shard(dim=1)" in placements and "_StridedShard" in placements, placements
    for rows in result["per_rank"]:
        assert sorted(rows) == ["fused_train AdamW", "fused_train AdamW8bit", "torch AdamW (foreach)"]
        ours = rows["fused_train AdamW8bit"]
        assert 2.0 < ours["state_bytes_per_param"] < 2.2 and ours["quantized_share"] > 0.95
        assert rows["fused_train AdamW"]["state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)
        assert rows["fused_train AdamW"]["quantized_share"] == 0.0
        assert all(row["ms"] > 0 for row in rows.values())
