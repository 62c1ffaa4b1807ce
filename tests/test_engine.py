import pytest
import torch
from helpers import Points, points_loop
from torch import nn

from cts.data.loader import build_loader
from cts.engine import (
    TrainLoop,
    TrainState,
    autocast,
    batches_from,
    fast_bf16,
    poly_schedule,
    prefer_matmul_attention,
    resolve_device,
    resolve_precision,
    resume,
    seed_everything,
)


def test_training_is_deterministic_on_cpu(tmp_path):
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        loop, state, loader, model = points_loop(tmp_path / name)
        state = loop.run(state, batches_from(loader, state.iteration))
        runs.append(([row["loss"] for row in state.history], model.state_dict()))
    assert runs[0][0] == runs[1][0]
    for key in runs[0][1]:
        assert torch.equal(runs[0][1][key], runs[1][1][key])


def test_interrupted_training_resumes_to_the_same_result(tmp_path):
    (tmp_path / "full").mkdir()
    loop, state, loader, reference = points_loop(tmp_path / "full")
    loop.run(state, batches_from(loader))

    (tmp_path / "cut").mkdir()
    loop, state, loader, _ = points_loop(tmp_path / "cut", fail_at=5)  # dies in iteration 5
    with pytest.raises(KeyboardInterrupt):
        loop.run(state, batches_from(loader))
    loop, state, loader, model = points_loop(tmp_path / "cut")
    assert state.iteration == 4  # the checkpoint written every 2 iterations
    state = loop.run(state, batches_from(loader, state.iteration))
    assert state.iteration == 6
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_resume_ignores_a_checkpoint_of_other_settings(tmp_path):
    loop, state, loader, model = points_loop(tmp_path)
    loop.run(state, batches_from(loader))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_schedule(6))
    assert resume(tmp_path / "last.pt", model, optimizer, scheduler, "other") is None


def _targets(batch: dict) -> torch.Tensor:
    """The labels with those of points whose first coordinate is > 0.5 ignored (-1): about a
    third, unevenly spread over micro-batches."""
    return batch["y"].masked_fill(batch["x"][:, 0] > 0.5, -1)


def _masked_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    logits = model(batch["x"])
    return nn.functional.cross_entropy(logits, _targets(batch), ignore_index=-1, reduction="sum")


def _masked_count(batch: dict) -> torch.Tensor:
    return (_targets(batch) != -1).sum()


@pytest.mark.parametrize("accum", [1, 2, 4])
def test_gradient_accumulation_matches_a_plain_loop_over_the_full_batch(accum):
    iterations = 5  # past the first epoch's 3 batches of 4: the second epoch reshuffles

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        seed_everything(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        schedule = poly_schedule(iterations, warmup=2)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    # The reference: one batch of 4 per step, its loss summed over the counted targets and
    # divided by their number, momentum and schedule carried from step to step.
    reference, optimizer, scheduler = fresh()
    batches = batches_from(build_loader(Points(), 4, True, 0, seed=0, drop_last=True))
    losses = []
    for _ in range(iterations):
        batch = next(batches)
        loss = _masked_loss(reference, batch) / _masked_count(batch).clamp(min=1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        losses.append(loss.item())

    model, optimizer, scheduler = fresh()
    loop = TrainLoop(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=_masked_loss,
        count_fn=_masked_count,
        iterations=iterations,
        device=torch.device("cpu"),
        grad_accum_steps=accum,
        log_every=1,
    )
    micro_batches = build_loader(Points(), 4 // accum, True, 0, seed=0, drop_last=True)
    state = loop.run(TrainState(), batches_from(micro_batches))
    assert [row["loss"] for row in state.history] == pytest.approx(losses, rel=1e-5)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_device_and_precision_errors_name_the_allowed_values():
    with pytest.raises(ValueError, match="allowed auto, cpu, cuda"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        autocast(torch.device("cpu"), "fp16")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.parametrize("fast", [True, False])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, fast):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: fast)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: fast)
    cpu = torch.device("cpu")
    assert fast_bf16(cpu) is fast
    assert resolve_precision(cpu, "auto") == ("bf16" if fast else "fp32")
    assert resolve_precision(cpu, "fp32") == "fp32" and resolve_precision(cpu, "bf16") == "bf16"
    with autocast(cpu, "auto"):
        out = torch.randn(4, 4) @ torch.randn(4, 4)
    assert out.dtype == (torch.bfloat16 if fast else torch.float32)
    with pytest.raises(ValueError, match="allowed auto, fp32, bf16, fp16"):
        resolve_precision(cpu, "fp8")


def test_matmul_attention_only_for_bf16_on_cpu(monkeypatch):
    from timm.models.vision_transformer import Attention

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    cpu = torch.device("cpu")
    for precision, fused in (("fp32", True), ("bf16", False), ("auto", False)):
        model = nn.Sequential(Attention(16, num_heads=2))
        model[0].fused_attn = True
        prefer_matmul_attention(model, cpu, precision)
        assert model[0].fused_attn is fused


def test_poly_schedule_warms_up_then_decays_to_zero():
    factor = poly_schedule(10, power=1.0, warmup=2)
    assert factor(0) == 0.5 and factor(1) == 1.0
    assert factor(2) == 1.0 and factor(10) == 0.0


class FewPoints(Points):
    """Ten points: five micro-batches of 2 per epoch, so with 2 accumulation steps the third
    optimizer step takes the last micro-batch of one epoch and the first of the next."""

    def __len__(self) -> int:
        return 10


def _accum_loop(folder, iterations: int = 6, fail_at: int | None = None):
    """``points_loop`` with 2 accumulation steps of 2 points over :class:`FewPoints`."""
    loop, state, _, model = points_loop(folder, iterations=iterations, fail_at=fail_at, accum=2)
    loader = build_loader(FewPoints(), 2, True, 0, seed=0, drop_last=True)
    return loop, state, loader, model


def test_resume_with_gradient_accumulation_is_bit_identical(tmp_path):
    """The resumed run skips iteration x grad_accum_steps micro-batches (not iteration), so
    it sees the data an uninterrupted run sees, across an epoch boundary inside a step."""
    (tmp_path / "full").mkdir()
    loop, state, loader, reference = _accum_loop(tmp_path / "full")
    loop.run(state, batches_from(loader, 0, grad_accum_steps=2))

    (tmp_path / "cut").mkdir()
    loop, state, loader, _ = _accum_loop(tmp_path / "cut", fail_at=9)  # dies in iteration 5
    with pytest.raises(KeyboardInterrupt):
        loop.run(state, batches_from(loader, 0, grad_accum_steps=2))
    loop, state, loader, model = _accum_loop(tmp_path / "cut")
    assert state.iteration == 4
    loop.run(state, batches_from(loader, state.iteration, grad_accum_steps=2))
    differ = [
        k for k, v in reference.state_dict().items() if not torch.equal(model.state_dict()[k], v)
    ]
    assert differ == []


def test_fp16_resume_restores_the_grad_scaler_and_is_bit_identical(tmp_path, monkeypatch):
    """fp16 on the CPU (torch's CPU autocast and GradScaler allow it; the engine refuses it
    to users): the scaler starts at 2**40 so that early steps overflow and back the scale
    off. A resumed run must continue at the saved scale, not restart at the initial one."""
    import functools

    import cts.engine

    monkeypatch.setattr(
        cts.engine, "autocast", lambda device, precision: torch.autocast("cpu", torch.float16)
    )
    monkeypatch.setattr(
        torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**40)
    )

    def fp16_loop(folder, fail_at=None):
        loop, state, loader, model = points_loop(folder, fail_at=fail_at)
        loop.precision = "fp16"
        return loop, state, loader, model

    (tmp_path / "full").mkdir()
    loop, state, loader, reference = fp16_loop(tmp_path / "full")
    loop.run(state, batches_from(loader))
    full_scale = loop._scaler.get_scale()
    assert full_scale < 2.0**40  # it did back off

    (tmp_path / "cut").mkdir()
    loop, state, loader, _ = fp16_loop(tmp_path / "cut", fail_at=5)
    with pytest.raises(KeyboardInterrupt):
        loop.run(state, batches_from(loader))
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert saved["grad_scaler"]["scale"] < 2.0**40
    loop, state, loader, model = fp16_loop(tmp_path / "cut")
    loop.run(state, batches_from(loader, state.iteration))
    assert loop._scaler.get_scale() == full_scale
    differ = [
        k for k, v in reference.state_dict().items() if not torch.equal(model.state_dict()[k], v)
    ]
    assert differ == []


def test_checkpoint_carries_the_cuda_rng_state_and_resume_restores_it(tmp_path, monkeypatch):
    """On a GPU dropout, drop-path and the random policy draw from the device's generator:
    it is saved per process and restored (faked here: no CUDA on the test machine)."""
    saved_state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: saved_state.clone())
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda state, device=None: restored.append(state)
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    loop, state, _, model = points_loop(tmp_path)
    loop.device = torch.device("cuda", 0)  # only the RNG calls see it
    loop._scaler = torch.amp.GradScaler("cpu", enabled=False)
    state.iteration = 2
    loop._save(state)
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    assert [t.tolist() for t in payload["cuda_rng_per_rank"]] == [saved_state.tolist()]
    assert payload["grad_scaler"] is None  # fp32: no scaler state
    points_loop(tmp_path)  # resumes from it
    assert [t.tolist() for t in restored] == [saved_state.tolist()]
