"""The measuring machinery of cts.throughput: the predict that is timed (one graph, the
policy net skipped at K = 0), compile modes, precisions, and out-of-memory errors as one line
that names the largest batch that fits."""

import pytest
import torch

from cts.models import build_segmenter
from cts.throughput.compilation import COMPILE_MODES, resolve_compile_mode, uses_cuda_graphs
from cts.throughput.devices import resolve_precisions
from cts.throughput.memory import (
    BenchmarkOutOfMemoryError,
    check_batch_fits,
    largest_fitting_batch,
    out_of_memory_as_error,
)

CPU = torch.device("cpu")


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


def test_bf16_without_device_support_falls_back_only_when_allowed(monkeypatch):
    assert resolve_precisions(["fp32", "bf16"], CPU, False) == ("fp32", "bf16")
    monkeypatch.setattr("cts.throughput.devices.bf16_supported", lambda device: False)
    with pytest.raises(ValueError, match="bf16 is not supported on cpu.*--allow-fp32-fallback"):
        resolve_precisions(["fp32", "bf16"], CPU, False)
    assert resolve_precisions(["bf16"], CPU, True) == ("fp32",)
    with pytest.raises(ValueError, match="precision"):
        resolve_precisions(["fp8"], CPU, True)


def test_compile_modes_match_the_pipeline_param_choices():
    from cts_stages.params import CHECKS

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
