import json

import pytest
import torch
from typer.testing import CliRunner

from cts import benchmark
from cts.benchmark import (
    COMPILE_MODES,
    BenchmarkOutOfMemoryError,
    TableSettings,
    check_batch_fits,
    largest_fitting_batch,
    markdown_table,
    out_of_memory_as_error,
    resolve_compile_mode,
    resolve_precisions,
    select_rows,
    uses_cuda_graphs,
)
from cts.cli import app
from cts.models import build_segmenter

CPU = torch.device("cpu")
runner = CliRunner()


@pytest.mark.parametrize("policy, k", [("policy_net", 6), ("none", 0), ("random", 3)])
def test_predict_is_the_argmax_of_the_logits(policy, k):
    torch.manual_seed(0)
    model = build_segmenter(
        backbone="vit_tiny_patch16_384",
        num_classes=7,
        crop_size=128,
        depth=1,
        policy=policy,
        num_tokens_shared=k,
        decoder="mask_transformer",
    ).eval()
    images = torch.randn(2, 3, 120, 100)  # padded inside, cropped back
    with torch.no_grad():
        torch.manual_seed(1)
        labels = model.predict(images)
        torch.manual_seed(1)
        logits = model(images).logits
    assert labels.shape == (2, 120, 100)
    assert torch.equal(labels, logits.argmax(1))


def test_k_zero_runs_no_policy_net(monkeypatch):
    torch.manual_seed(0)
    model = build_segmenter(
        backbone="vit_tiny_patch16_384", num_classes=3, crop_size=64, depth=1, num_tokens_shared=2
    ).eval()

    def refuse(*args, **kwargs):
        raise AssertionError("the policy net ran for K = 0")

    monkeypatch.setattr(model.policy_net, "forward", refuse)
    with torch.no_grad():
        assert model.predict(torch.randn(1, 3, 64, 64), 0).shape == (1, 64, 64)


def test_policy_net_runs_channels_last_with_unchanged_results():
    torch.manual_seed(0)
    model = build_segmenter(
        backbone="vit_tiny_patch16_384", num_classes=3, crop_size=128, depth=1, num_tokens_shared=4
    ).eval()
    policy = model.policy_net
    assert policy.head.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        fast = policy(images, (4, 4))
        policy.to(memory_format=torch.contiguous_format)
        reference = policy.head(policy.backbone(images * policy.in_scale + policy.in_shift)[-1])
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)


def test_largest_fitting_batch_bisects_the_limit():
    calls = []

    def fits(batch):
        calls.append(batch)
        return batch <= 11

    assert largest_fitting_batch(fits, 32) == 11
    assert len(calls) <= 5
    assert largest_fitting_batch(lambda b: False, 32) == 0


def test_out_of_memory_names_the_largest_batch_that_fits():
    def run(batch):
        if batch > 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(BenchmarkOutOfMemoryError) as error:
        check_batch_fits(run, 64, CPU, "ViT-L/16 640 (bf16)")
    message = str(error.value)
    assert "batch 64 of ViT-L/16 640 (bf16) does not fit" in message
    assert "the largest batch that fits is 5: set --batch-size 5" in message
    assert "\n" not in message

    with pytest.raises(BenchmarkOutOfMemoryError, match="not even a batch of 1"):
        check_batch_fits(lambda b: (_ for _ in ()).throw(torch.OutOfMemoryError()), 4, CPU, "x")


def test_other_errors_are_not_mistaken_for_out_of_memory():
    def run(batch):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        check_batch_fits(run, 8, CPU, "x")


def test_bf16_without_device_support_falls_back_only_when_allowed(monkeypatch):
    assert resolve_precisions(["fp32", "bf16"], CPU, False) == ("fp32", "bf16")
    monkeypatch.setattr(benchmark, "bf16_supported", lambda device: False)
    with pytest.raises(ValueError, match="bf16 is not supported on cpu.*--allow-fp32-fallback"):
        resolve_precisions(["fp32", "bf16"], CPU, False)
    assert resolve_precisions(["bf16"], CPU, True) == ("fp32",)
    with pytest.raises(ValueError, match="precision"):
        resolve_precisions(["fp8"], CPU, True)


def test_predict_compiles_to_one_graph_for_every_k_and_precision():
    # What CUDA graphs need: no graph break, no host sync (backend "eager": tracing only).
    torch.manual_seed(0)
    model = build_segmenter(
        backbone="vit_tiny_patch16_384",
        num_classes=5,
        crop_size=128,
        depth=1,
        num_tokens_shared=4,
        policy_feature_stride=16,
        policy_input_scale=0.5,
    ).eval()
    images = torch.randn(2, 3, 128, 128)
    torch.compiler.reset()
    compiled = torch.compile(model.predict, backend="eager", fullgraph=True, dynamic=False)
    with torch.inference_mode():
        for k in (4, 0):
            assert torch.equal(compiled(images, k), model.predict(images, k))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            compiled(images, 4)
    torch.compiler.reset()


def test_out_of_memory_during_timing_is_one_line():
    def timed():
        with out_of_memory_as_error(
            "timing ViT-B/16 512 (bf16)", "set a smaller --batch-size", CPU
        ):
            raise torch.OutOfMemoryError("CUDA out of memory.\nTried to allocate 20.00 GiB")

    with pytest.raises(BenchmarkOutOfMemoryError) as error:
        timed()
    assert str(error.value) == (
        "out of memory while timing ViT-B/16 512 (bf16) on cpu: set a smaller --batch-size"
    )
    with pytest.raises(ValueError), out_of_memory_as_error("x", "y", CPU):
        raise ValueError("not memory")


def test_compile_modes_match_the_pipeline_param_choices():
    from stages.params import CHECKS

    assert CHECKS["bench_compile"]("max-autotune-no-cudagraphs") is None
    for mode in COMPILE_MODES:
        assert CHECKS["bench_compile"](mode) is None
    assert CHECKS["bench_compile"]("fast") is not None
    assert uses_cuda_graphs("reduce-overhead") and uses_cuda_graphs("max-autotune")
    assert not uses_cuda_graphs("default") and not uses_cuda_graphs("none")
    assert not uses_cuda_graphs("max-autotune-no-cudagraphs")


def test_compile_mode_auto_is_eager_on_cpu_and_unknown_modes_are_refused():
    assert resolve_compile_mode("auto", CPU) == "none"
    assert resolve_compile_mode("reduce-overhead", CPU) == "reduce-overhead"
    with pytest.raises(ValueError, match="compile mode 'fast'"):
        resolve_compile_mode("fast", CPU)


def test_rows_are_the_papers_and_unknown_rows_are_named():
    rows = select_rows(None)
    assert [(r.crop_size, r.num_tokens_shared) for r in rows] == [
        (512, 103),
        (512, 103),
        (512, 103),
        (640, 160),
        (768, 336),
    ]
    assert [r.key for r in select_rows(["vit_s_768", "vit_ti_512"])] == ["vit_ti_512", "vit_s_768"]
    with pytest.raises(ValueError, match="vit_h_1024"):
        select_rows(["vit_h_1024"])


def test_throughput_command_writes_the_table(tmp_path):
    out = tmp_path / "throughput"
    result = runner.invoke(
        app,
        [
            "throughput",
            "--row",
            "vit_ti_512",
            "--depth",
            "1",
            "--batch-size",
            "2",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "throughput.json").read_text())
    assert data["environment"]["device"] == "cpu"
    assert data["environment"]["compile_mode"] == "none"
    rows = data["rows"]
    assert [r["precision"] for r in rows] == ["fp32", "bf16"]
    for r in rows:
        assert (r["tokens_no_sharing"], r["tokens"]) == (1024, 715)
        assert 0 < r["gflops"] < r["gflops_no_sharing"]
        assert r["peak_memory_mib"] is None  # CPU
        assert r["ims_per_sec"] > 0 and r["ims_per_sec_no_sharing"] > 0
        assert r["speedup"] == pytest.approx(r["ims_per_sec"] / r["ims_per_sec_no_sharing"])
        assert 0.5 < r["bf16_fp32_agreement"] <= 1.0
        assert 0.5 < r["bf16_fp32_agreement_no_sharing"] <= 1.0
        assert 0 < r["policy_share"] < 1
    table = (out / "throughput.md").read_text()
    assert table == markdown_table(rows, data["environment"])
    assert "| ViT-Ti/16 512 | ADE20K | 103 | 1024 -> 715 | half (x0.5, stride 16) |" in table
    assert "| ViT-Ti/16 512 |" in result.output


def test_throughput_command_refuses_bf16_without_support(monkeypatch, tmp_path):
    monkeypatch.setattr(benchmark, "bf16_supported", lambda device: False)
    result = runner.invoke(app, ["throughput", "--precision", "bf16", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "bf16 is not supported on cpu" in result.output
    assert not (tmp_path / "throughput.json").exists()


def test_table_settings_are_recorded():
    env = benchmark.environment(CPU, TableSettings(batch_size=3, depth=2))
    assert env["batch_size"] == 3 and env["depth"] == 2 and env["compile_mode"] == "none"
    assert env["torch"] == torch.__version__
    assert env["policies"] == ("half",)  # the table's default policy setting


def test_policy_settings_by_name():
    assert TableSettings.for_device(CPU, policies=["quarter", "paper", "quarter"]).policies == (
        "quarter",
        "paper",
    )
    assert TableSettings.for_device(CPU).policies == ("half",)
    with pytest.raises(ValueError, match="policy \\['tiny'\\]: allowed paper, half, quarter"):
        TableSettings.for_device(CPU, policies=["tiny"])


def test_throughput_shows_policy_settings_side_by_side_with_the_policy_net_time(
    monkeypatch, tmp_path
):
    tiny = benchmark.TableRow("vit_ti_128", "ViT-Ti/16 128", "vit_tiny_patch16_384", 128, 4, 5, "X")
    monkeypatch.setattr(benchmark, "PAPER_TABLE", (tiny,))
    out = tmp_path / "throughput"
    args = ["throughput", "--depth", "1", "--batch-size", "2", "--warmup", "0", "--repeats", "1"]
    args += ["--precision", "fp32", "--out", str(out), "--policy", "quarter", "--paper-policy"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "throughput.json").read_text())
    assert data["environment"]["policies"] == ["paper", "quarter"]
    paper, quarter = data["rows"]
    assert paper["policy"] == "paper (x1, stride 32)"
    assert quarter["policy"] == "quarter (x0.25, stride 8)"
    # The same segmenter: only the policy net's multiply-adds differ.
    assert paper["gflops_no_sharing"] == quarter["gflops_no_sharing"]
    assert paper["gflops"] > quarter["gflops"]
    for record in (paper, quarter):
        assert 0 < record["policy_ms_per_batch"] < record["ms_per_batch"]
        assert record["policy_share"] == pytest.approx(
            record["policy_ms_per_batch"] / record["ms_per_batch"]
        )
    table = (out / "throughput.md").read_text()
    assert "paper (x1, stride 32), quarter (x0.25, stride 8)" in table
    assert "| 64 -> 52 | quarter (x0.25, stride 8) |" in table
    assert "policy paper (x1, stride 32), fp32:" in result.output
