"""The command line: ``fused-train demo | bench | info``, the digits dataset and the demo's loops."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_train
from fused_train import benchmarking, cli, demo
from fused_train.data import BatchLoader, DatasetUnavailable, load_dataset, load_digits

from conftest import cpu_half_gemms

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DIGITS_VALIDATION_SIZE = 360
# --plot draws with matplotlib, an optional extra ([plot], [test]); without it the tests of a chart skip.
NO_MATPLOTLIB = "matplotlib is not installed: --plot needs it (pip install fused_train[plot])"
TORCH_OPTIMIZER_NAMES = {"sgd": "torch.optim.SGD", "adam": "torch.optim.Adam", "adamw": "torch.optim.AdamW",
                         "rmsprop": "torch.optim.RMSprop"}


@pytest.fixture(autouse=True)
def _restore_threads():
    # The demo's --threads sets torch's global thread count; other test files must not inherit it.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_demo(tmp_path, *flags):
    """Runs ``fused-train demo`` in this process (one thread: on a busy 2-core CI machine a second
    OpenMP thread waits for a core and makes the run many times slower) and returns its JSON."""
    path = tmp_path / "demo.json"
    assert cli.main(["demo", "--quiet", "--threads", "1", "--json", str(path), *flags]) == 0
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------
# demo
def test_demo_one_epoch_writes_readable_json_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason=NO_MATPLOTLIB)
    plot = tmp_path / "curves.png"
    result = run_demo(tmp_path, "--epochs", "1", "--plot", str(plot))

    assert result["settings"]["epochs"] == 1
    assert result["settings"]["optimizer"] == "adam"
    assert result["dataset"]["validation_size"] == DIGITS_VALIDATION_SIZE
    assert result["build_info"] == fused_train.build_info() | {"num_threads": 1}
    (epoch,) = result["runs"]["fused_train"]["epochs"]
    assert epoch["epoch"] == 1
    assert epoch["seconds"] == pytest.approx(epoch["train_seconds"] + epoch["val_seconds"])
    assert 0 < epoch["val_loss"] < 1.0
    # One epoch of Adam on the digits is already ~90% accurate; chance is 10%.
    assert epoch["accuracy"] > 0.8
    assert result["runs"]["fused_train"]["optimizer"] == "fused_train.optim.Adam"
    assert result["runs"]["fused_train"]["loss"] == "fused_train.nn.CrossEntropyLoss"
    assert "torch" not in result["runs"]

    assert plot.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    image = matplotlib.image.imread(plot)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 200
    out = capsys.readouterr().out
    assert "fused_train.optim.Adam + fused_train.nn.CrossEntropyLoss" in out
    assert f"wrote {plot}" in out


def test_demo_prints_one_line_per_epoch(capsys):
    assert cli.main(["demo", "--epochs", "2", "--threads", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2
    assert lines[1].startswith("epoch 2/2 · train loss ")
    assert " · val loss " in lines[1] and " · accuracy " in lines[1] and lines[1].endswith(" s")


def test_demo_defaults_reach_95_percent_on_digits(tmp_path):
    result = run_demo(tmp_path)
    assert result["settings"] == {
        "data": "digits", "root": None, "epochs": 10, "batch_size": 64, "lr": 1e-3, "optimizer": "adam",
        "device": "cpu", "seed": 0, "threads": 1, "compare": False,
    }
    assert result["runs"]["fused_train"]["final_accuracy"] >= 0.95


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "rmsprop"])
def test_compare_fused_and_torch_reach_the_same_accuracy(tmp_path, optimizer):
    # Same seed: same initial weights and batch order, so the two runs differ only by floating-point
    # rounding. The fused kernels follow torch's operation order in fp32 (per-step parity ~1e-5
    # relative, see conftest.TOL); after 2 epochs (46 steps) such differences can flip only a
    # validation image whose two top logits are nearly tied. Tolerance: 2 of the 360 images
    # (0.56 points), and the losses to 1e-3 relative.
    result = run_demo(tmp_path, "--epochs", "2", "--compare", "--optimizer", optimizer)
    fused, stock = result["runs"]["fused_train"], result["runs"]["torch"]
    assert stock["optimizer"] == TORCH_OPTIMIZER_NAMES[optimizer]
    assert stock["loss"] == "torch.nn.CrossEntropyLoss"
    assert len(fused["epochs"]) == len(stock["epochs"]) == 2
    for f, s in zip(fused["epochs"], stock["epochs"]):
        assert abs(f["accuracy"] - s["accuracy"]) * DIGITS_VALIDATION_SIZE <= 2
        assert f["train_loss"] == pytest.approx(s["train_loss"], rel=1e-3)
        assert f["val_loss"] == pytest.approx(s["val_loss"], rel=1e-3)
    assert fused["final_accuracy"] > 0.85  # and both actually learned
    summary = result["summary"]
    assert summary["speedup_median_epoch"] == pytest.approx(
        stock["median_epoch_seconds"] / fused["median_epoch_seconds"])


def test_compare_prints_both_side_by_side(capsys):
    assert cli.main(["demo", "--epochs", "1", "--compare", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "fused_train" in line and "torch" in line
                  and "+" not in line)
    assert header.index("fused_train") < header.index("torch")
    row = next(line for line in out.splitlines() if line.lstrip().startswith("1/1 "))
    assert row.count("%") == 2 and row.endswith("×")
    assert "as fast as torch per epoch" in out


def test_lm_demo_trains_on_stdlib_text_with_the_same_loss_curve_as_torch(tmp_path):
    """--task lm --compare: the fused head + loss and linear + torch.nn.CrossEntropyLoss from the same seed
    follow the same loss curve (same model, batches and math; only rounding differs), and the loss falls. In a
    process of its own with every block above 128 KiB mapped on allocation and unmapped when freed (as
    fused_train.benchmarking.run_json_in_subprocess's exact_resident_memory), so that its peak memory is the steps'
    own: in the test process, memory earlier tests freed and glibc kept resident could hide a step's growth."""
    path = tmp_path / "demo.json"
    done = subprocess.run(
        [sys.executable, "-m", "fused_train", "demo", "--quiet", "--threads", "1", "--json", str(path), "--task", "lm",
         "--compare", "--steps", "12", "--batch-size", "8"],
        env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(path.read_text())
    assert result["settings"]["task"] == "lm" and result["settings"]["optimizer"] == "adamw"
    assert result["dataset"]["vocab_size"] == 8192 and result["dataset"]["validation_tokens"] > 10_000
    fused, stock = result["runs"]["fused_train"], result["runs"]["torch"]
    assert fused["optimizer"] == "fused_train.optim.AdamW" and stock["optimizer"] == "torch.optim.AdamW"
    assert len(fused["train_losses"]) == 12
    assert fused["train_losses"] == pytest.approx(stock["train_losses"], rel=1e-3)
    assert fused["final_val_loss"] == pytest.approx(stock["final_val_loss"], rel=1e-3)
    # From log(8192) = 9.0 at the start to well below it.
    assert fused["train_losses"][0] > 8.5 and fused["final_val_loss"] < 7.5
    assert fused["median_step_seconds"] > 0 and stock["peak_memory_mib"] > 0


# ---------------------------------------------------------------------------------------------------
# usage errors: exit status 2 and a message that names the flag
@pytest.mark.parametrize("argv, flag", [
    (["demo", "--epochs", "0"], "--epochs"),
    (["demo", "--epochs", "ten"], "--epochs"),
    (["demo", "--batch-size", "-4"], "--batch-size"),
    (["demo", "--lr", "-0.1"], "--lr"),
    (["demo", "--lr", "nan"], "--lr"),
    (["demo", "--optimizer", "lion"], "--optimizer"),
    (["demo", "--device", "tpu"], "--device"),
    (["demo", "--data", "imagenet"], "--data"),
    (["demo", "--learning-rate", "0.1"], "--learning-rate"),
    (["demo", "--root", "."], "--root"),
    (["demo", "--json", os.path.join("no", "such", "dir", "x.json")], "--json"),
    (["demo", "--plot", os.path.join("no", "such", "dir", "x.png")], "--plot"),
    (["bench", "--benchmarks-dir", os.path.join("no", "such", "dir")], "--benchmarks-dir"),
    (["demo", "--steps", "10"], "--steps"),
    (["demo", "--task", "lm", "--epochs", "3"], "--epochs"),
    (["demo", "--task", "lm", "--data", "fashion-mnist"], "--data"),
    (["demo", "--task", "translate"], "--task"),
    (["train"], "train"),
    ([], "demo,bench,info"),
])
def test_bad_flags_are_usage_errors_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: fused-train" in err
    assert flag in err


@pytest.mark.skipif(torch.cuda.is_available() and fused_train.build_info()["cuda_compiled"],
                    reason="a CUDA device and CUDA kernels are present here")
def test_device_cuda_without_a_usable_gpu_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "argument --device: cuda was requested" in capsys.readouterr().err


def test_fashion_mnist_without_files_says_why(tmp_path, capsys):
    # Whether torchvision is missing or the files are: a usage error that says which, never a download.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--data", "fashion-mnist", "--root", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--data fashion-mnist" in err
    assert ("torchvision" in err) and ("not installed" in err or str(tmp_path) in err)
    assert not (tmp_path / "FashionMNIST").exists()
    with pytest.raises(DatasetUnavailable, match="--root"):
        load_dataset("fashion-mnist")


# ---------------------------------------------------------------------------------------------------
# the dataset and the loop pieces
def test_digits_split_is_fixed_stratified_and_standardized():
    first, second = load_digits(), load_digits()
    assert (len(first.train), len(first.validation)) == (1437, 360)
    assert first.image_shape == (1, 8, 8) and first.num_features == 64 and first.num_classes == 10
    assert torch.equal(first.validation.images, second.validation.images)
    assert torch.equal(first.train.labels, second.train.labels)
    assert torch.bincount(first.validation.labels, minlength=10).min() >= 35  # every class, ~36 each
    mean = first.train.images.mean(dim=0)
    std = first.train.images.std(dim=0)
    assert mean.abs().max() < 1e-5
    varying = std > 1e-3
    assert torch.allclose(std[varying], torch.ones_like(std[varying]), atol=1e-4)


def test_batch_loader_same_seed_same_batches_and_every_sample_once():
    data = load_digits()
    a = BatchLoader(data.train, batch_size=100, shuffle=True, seed=7)
    b = BatchLoader(data.train, batch_size=100, shuffle=True, seed=7)
    torch.manual_seed(123)  # the global generator must not matter
    batches_a = list(a)
    torch.rand(10)
    batches_b = list(b)
    assert len(batches_a) == len(a) == 15
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    labels = torch.cat([y for _, y in batches_a])
    assert torch.equal(torch.sort(labels).values, torch.sort(data.train.labels).values)
    assert not torch.equal(labels, data.train.labels)  # shuffled
    second_epoch = torch.cat([y for _, y in a])
    assert not torch.equal(second_epoch, labels)  # reshuffled every epoch


@pytest.mark.smoke
def test_train_loop_lets_the_fused_step_zero_the_gradients():
    torch.set_num_threads(1)  # restored by _restore_threads; see run_demo
    data = load_digits()
    torch.manual_seed(0)
    model = demo.NeuralNetwork(data.num_features, data.num_classes)
    loss_fn, optimizer = demo.make_loss_and_optimizer("fused_train", model, "adam", 1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    loss = demo.train_loop(BatchLoader(data.train, 64), model, loss_fn, optimizer)
    assert 0 < loss < 2.5
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    # The loop keeps gradients allocated, so they end zeroed (by the kernel), not dropped.
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    val_loss, accuracy = demo.test_loop(BatchLoader(data.validation, 64), model, loss_fn)
    assert val_loss > 0 and 0.5 < accuracy <= 1


# ---------------------------------------------------------------------------------------------------
# bench
# The two row shapes the project's benchmark files return: one row per case timing both implementations
# (bench_cross_entropy.py), and one row per implementation with its own copy share (bench_optimizers.py).
FAKE_CROSS_ENTROPY_BENCHMARK = textwrap.dedent('''
    def run(device="cpu", quick=False):
        return [
            {"device": device, "N": 4096, "V": 32000, "dtype": "bfloat16", "torch_ms": 2.0, "fused_ms": 0.5,
             "ratio": 0.25, "fused_gbps": 5.0, "quick": quick},
            {"device": device, "N": 8, "V": 10, "dtype": "float32", "torch_ms": 0.01, "fused_ms": 0.02,
             "ratio": 2.0, "fused_gbps": 0.5, "quick": quick},
        ]
''')
FAKE_OPTIMIZER_BENCHMARK = textwrap.dedent('''
    def run(device="cpu", quick=False):
        rows = []
        for impl, ms in (("fused_train", 1.0), ("torch forloop", 4.0), ("torch fused", 1.25)):
            rows.append(dict(optimizer="Adam", shape="16 x 1M", impl=impl, ms=ms, ratio_vs_this=1.0 / ms,
                             gbs=10.0 / ms, pct_copy_bw=50.0 / ms, copy_gbs=20.0, device=device))
        return rows
''')


def test_bench_tables_json_and_ratio_chart(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason=NO_MATPLOTLIB)
    (tmp_path / "bench_cross_entropy.py").write_text(FAKE_CROSS_ENTROPY_BENCHMARK)
    (tmp_path / "bench_optimizers.py").write_text(FAKE_OPTIMIZER_BENCHMARK)
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert cli.main(["bench", "--quick", "--benchmarks-dir", str(tmp_path), "--json", str(out_json),
                     "--plot", str(out_png)]) == 0
    out = capsys.readouterr().out
    assert "copy bandwidth" in out and "GB/s" in out
    # Columns equal in every row are said once above the table, not on every line.
    assert any("copy_gbs 20.0" in line and "device cpu" in line for line in out.splitlines())

    result = json.loads(out_json.read_text())
    assert result["missing"] == []
    copy_gbps = result["copy_GBps"]
    assert copy_gbps > 0
    cross_entropy = result["benchmarks"]["cross_entropy"]
    assert [r["ratio"] for r in cross_entropy] == [0.25, 2.0]
    assert cross_entropy[0]["fused_gbps % copy"] == pytest.approx(100 * 5.0 / copy_gbps)
    assert all(r["quick"] is True for r in cross_entropy)
    optimizers = result["benchmarks"]["optimizers"]
    assert not any("% copy" in key for row in optimizers for key in row)  # they brought their own share
    assert [benchmarking.fused_over_torch(r) for r in optimizers] == [None, 0.25, 0.8]
    assert out_png.read_bytes()[:8] == PNG_MAGIC


def test_bench_says_which_benchmark_file_is_missing(tmp_path, capsys):
    (tmp_path / "bench_cross_entropy.py").write_text(FAKE_CROSS_ENTROPY_BENCHMARK)
    assert cli.main(["bench", "--quick", "--benchmarks-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "bench_optimizers.py not found" in captured.err
    assert "bench_cross_entropy.py" not in captured.err
    assert "N=4096" not in captured.out and "4096" in captured.out


def test_bench_with_no_benchmark_files_fails_clearly(tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--benchmarks-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "bench_optimizers.py not found" in err and "bench_cross_entropy.py not found" in err
    assert "nothing to run" in err


def test_benchmark_table_cells():
    assert benchmarking.format_value(0.000123) == "1.23e-04"
    assert benchmarking.format_value(1234.5) == "1234"
    assert benchmarking.format_value(None) == ""
    assert benchmarking.format_value(torch.bfloat16) == "bfloat16"
    table = benchmarking.format_table([{"impl": "fused_train", "ms": 1.5}, {"impl": "torch", "ms": 12.25}])
    header, rule, first, second = table.splitlines()
    assert header.split() == ["impl", "ms"] and set(rule) <= {"-", " "}
    assert first.endswith(" 1.50") and second.endswith(" 12.2")  # numbers right-aligned


# ---------------------------------------------------------------------------------------------------
# info and the module entry point
def test_describe_build_in_words():
    info = {"torch_version": "2.5.0", "torch_runtime": "2.6.0", "cuda_compiled": True,
            "cuda_archs": ["8.0", "9.0"], "cpu_capability": "avx2", "cpu_bf16_dot_product": False, "num_threads": 4,
            "cuda_available": False}
    text = cli.describe_build(info)
    assert "compiled for 8.0, 9.0" in text
    assert "AVX2" in text
    assert "no bf16 dot products: linear_cross_entropy runs its bf16 GEMMs in fp32, over tiles" in text
    native = cli.describe_build(info | {"cpu_bf16_dot_product": True})
    if torch.backends.mkldnn.is_available():
        assert "(AVX512_BF16): linear_cross_entropy runs its bf16 GEMMs in bf16 (oneDNN" in native
    with cpu_half_gemms("fp32"):
        assert "in fp32, over tiles (oneDNN off or FUSED_TRAIN_CPU_HALF_GEMMS=fp32)" in cli.describe_build(
            info | {"cpu_bf16_dot_product": True})
    assert "4 intra-op threads" in text
    assert "MISMATCH" in text
    assert "MISMATCH" not in cli.describe_build(info | {"torch_runtime": "2.5.0"})
    assert "CPU-only build" in cli.describe_build(info | {"cuda_compiled": False, "cuda_archs": []})


def test_python_dash_m_fused_train_info():
    env = dict(os.environ)
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(fused_train.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([repo_root, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "fused_train", "info"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"fused_train {fused_train.__version__}")
    assert torch.__version__ in done.stdout
    assert "CPU kernels" in done.stdout
    assert ("dot products (AVX512_BF16)" in done.stdout) == fused_train.build_info()["cpu_bf16_dot_product"]
