"""Tests of hf_sad.distillation.losses against a plain float64 transcription of the formulas."""

from __future__ import annotations

import math

import pytest
import torch

import hf_sad.distillation.losses as losses
from hf_sad.distillation.losses import adaptive_distillation_loss, focal_distillation_loss, kl_distillation_loss

B, N, C = 2, 7, 5
EPS32 = torch.finfo(torch.float32).eps


def sum_rtol(num_terms: int, ops_per_term: int = 0, dtype: torch.dtype = torch.float32) -> float:
    """Relative tolerance between two evaluations of a sum of `num_terms` non-negative terms that may differ in
    summation order (chunks, masks, vector widths: Intel and AMD kernels reduce differently) and, with
    `ops_per_term`, in how many roundings each term went through. Each evaluation is within
    (num_terms - 1 + ops_per_term) * eps of the exact sum (Higham, Accuracy and Stability, 4.2), so two are within
    twice that. A bound from the operation and the dtype, not from what one machine happened to produce."""
    return 2 * (num_terms - 1 + ops_per_term) * torch.finfo(dtype).eps


def _logits(*shape: int, scale: float = 3.0, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _pair(dtype: torch.dtype = torch.float64, shape: tuple[int, ...] = (B, N, C)) -> tuple[torch.Tensor, torch.Tensor]:
    return _logits(*shape, seed=0, dtype=dtype), _logits(*shape, seed=1, dtype=dtype)


def reference_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 2.0,
    temperature: float = 1.0,
    variant: str = "paper",
    alpha: float = 0.5,
    mask: torch.Tensor | None = None,
    normalizer: str | float = "adaptive",
    power: float = 1.8,
    detach_weight: bool = False,
) -> torch.Tensor:
    """The formulas written plainly in float64 (exact for moderate logits)."""
    s = student.double() / temperature
    t = teacher.detach().double() / temperature
    p, q = torch.sigmoid(s), torch.sigmoid(t)
    kl = q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))
    entropy = -(q * torch.log(q) + (1 - q) * torch.log(1 - q))
    weight = (1 - torch.exp(-(kl + beta * entropy))) ** gamma
    if detach_weight:
        weight = weight.detach()
    cross_entropy = -(alpha * q * torch.log(p) + (1 - alpha) * (1 - q) * torch.log(1 - p))
    target = kl if variant == "paper" else cross_entropy
    m = torch.ones_like(q) if mask is None else _full_mask(mask, q.shape).double()
    if normalizer == "adaptive":
        norm = torch.clamp((q**power * m).sum(), min=1.0)
    elif normalizer == "none":
        norm = 1.0
    else:
        norm = float(normalizer)
    return (weight * target * m).sum() / norm * temperature**2


def _full_mask(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return (mask.unsqueeze(-1) if mask.dim() < len(shape) else mask).expand(shape)


def _loss_and_grad(fn, student: torch.Tensor, teacher: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    student = student.detach().clone().requires_grad_()
    loss = fn(student, teacher, **kwargs)
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), grad


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


# (public function, its kwargs, the matching reference kwargs)
CASES = {
    "adl-paper": (adaptive_distillation_loss, {}, {}),
    "adl-paper-options": (
        adaptive_distillation_loss,
        {"beta": 0.5, "gamma": 1.5, "temperature": 2.0, "power": 1.5},
        {"beta": 0.5, "gamma": 1.5, "temperature": 2.0, "power": 1.5},
    ),
    "adl-paper-detached": (adaptive_distillation_loss, {"detach_weight": True}, {"detach_weight": True}),
    "adl-released": (adaptive_distillation_loss, {"variant": "released"}, {"variant": "released"}),
    "adl-released-options": (
        adaptive_distillation_loss,
        {"variant": "released", "gamma": 0.5, "beta": 0.3, "alpha": 0.25, "detach_weight": True},
        {"variant": "released", "gamma": 0.5, "beta": 0.3, "alpha": 0.25, "detach_weight": True},
    ),
    "adl-gamma1": (adaptive_distillation_loss, {"gamma": 1.0, "beta": 2.0}, {"gamma": 1.0, "beta": 2.0}),
    "kl": (kl_distillation_loss, {"temperature": 1.5}, {"gamma": 0.0, "temperature": 1.5}),
    "focal": (focal_distillation_loss, {}, {"beta": 0.0}),
    "focal-gamma3": (focal_distillation_loss, {"gamma": 3.0}, {"beta": 0.0, "gamma": 3.0}),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("masked", [False, True])
def test_matches_float64_reference(name: str, masked: bool):
    fn, kwargs, ref_kwargs = CASES[name]
    student, teacher = _pair()
    mask = torch.rand(B, N, generator=torch.Generator().manual_seed(2)) > 0.3 if masked else None
    ref_loss, ref_grad = _loss_and_grad(reference_loss, student, teacher, mask=mask, **ref_kwargs)

    loss, grad = _loss_and_grad(fn, student, teacher, mask=mask, **kwargs)
    assert loss.dtype == torch.float64
    assert _rel_err(loss, ref_loss) < 1e-6
    assert _rel_err(grad, ref_grad) < 1e-6

    # The fp32 path (what training runs) is only limited by fp32 rounding: ~20 operations per entry, then the sums.
    loss32, grad32 = _loss_and_grad(fn, student.float(), teacher.float(), mask=mask, **kwargs)
    assert loss32.dtype == torch.float32 and grad32.dtype == torch.float32
    rtol = sum_rtol(student.numel(), ops_per_term=20)
    assert _rel_err(loss32, ref_loss) < rtol
    assert _rel_err(grad32, ref_grad) < rtol


@pytest.mark.parametrize(
    "kwargs",
    [
        {"gamma": 2.0},
        {"gamma": 2.5, "beta": 0.5, "temperature": 1.7},
        {"gamma": 1.0},
        {"gamma": 0.5},
        {"gamma": 0.0},
        {"gamma": 3.0, "beta": 0.0},
        {"variant": "released"},
        {"variant": "released", "gamma": 0.5, "alpha": 0.3},
        {"variant": "released", "gamma": 1.0, "beta": 2.0},
    ],
)
def test_gradcheck(kwargs: dict):
    # detach_weight is not a true gradient, so it is checked against the reference instead.
    student, teacher = _pair(shape=(2, 3, 4))
    mask = torch.tensor([[True, False, True], [True, True, True]])
    student.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s: adaptive_distillation_loss(s, teacher, mask=mask, **kwargs), (student,), eps=1e-6, atol=1e-7
    )


def test_gradcheck_baselines():
    student, teacher = _pair(shape=(3, 4))
    student.requires_grad_()
    assert torch.autograd.gradcheck(lambda s: kl_distillation_loss(s, teacher), (student,))
    assert torch.autograd.gradcheck(lambda s: focal_distillation_loss(s, teacher, gamma=1.5), (student,))


def test_identical_logits():
    logits = _logits(B, N, C, dtype=torch.float32)
    student = logits.clone().requires_grad_()
    for fn in (kl_distillation_loss, adaptive_distillation_loss, focal_distillation_loss):
        loss = fn(student, logits)
        (grad,) = torch.autograd.grad(loss, student)
        assert loss.abs().item() < 1e-7
        assert grad.abs().max().item() < 1e-7

    # The released variant keeps its entropy part: with KL = 0, CE_0.5 = H / 2 and the weight is (1 - e^-H) ** 2.
    released = adaptive_distillation_loss(logits, logits, variant="released")
    q = torch.sigmoid(logits.double())
    entropy = -(q * q.log() + (1 - q) * (1 - q).log())
    expected = ((1 - torch.exp(-entropy)) ** 2 * 0.5 * entropy).sum() / torch.clamp((q**1.8).sum(), min=1.0)
    # fp32 against float64: two sums (loss and normaliser) of ~20-op terms
    assert released.item() == pytest.approx(expected.item(), rel=2 * sum_rtol(logits.numel(), ops_per_term=20))


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_mask_equals_selected_subset(variant: str):
    student, teacher = _pair(torch.float32)
    mask = torch.tensor([[True, False, True, True, False, True, True], [False] * 3 + [True] * 4])
    student.requires_grad_()
    loss, stats = adaptive_distillation_loss(student, teacher, mask=mask, variant=variant, return_stats=True)
    (grad,) = torch.autograd.grad(loss, student)

    subset = student.detach()[mask].requires_grad_()  # (K, C)
    sub_loss, sub_stats = adaptive_distillation_loss(subset, teacher[mask], variant=variant, return_stats=True)
    (sub_grad,) = torch.autograd.grad(sub_loss, subset)

    rtol = sum_rtol(student.numel())  # the same terms summed in another order (masked entries add zeros)
    torch.testing.assert_close(loss, sub_loss, rtol=rtol, atol=0)
    torch.testing.assert_close(stats["normalizer"], sub_stats["normalizer"], rtol=rtol, atol=0)
    torch.testing.assert_close(grad[mask], sub_grad, rtol=rtol, atol=0)
    assert grad[~mask].abs().max() == 0


def test_mask_broadcasting():
    student, teacher = _pair(torch.float32)
    anchor_mask = torch.tensor([True, False, True, True, False, True, True])  # (N,), the same for each image
    by_image = anchor_mask.expand(B, N)
    full = by_image.unsqueeze(-1).expand(B, N, C)
    losses_ = [adaptive_distillation_loss(student, teacher, mask=m) for m in (anchor_mask, by_image, full.clone())]
    for other in losses_[1:]:  # per-anchor and per-entry masks sum the same terms in another order
        torch.testing.assert_close(other, losses_[0], rtol=sum_rtol(student.numel()), atol=0)

    # A genuinely per-class mask matches the reference.
    per_class = torch.rand(B, N, C, generator=torch.Generator().manual_seed(3)) > 0.5
    loss = adaptive_distillation_loss(student.double(), teacher.double(), mask=per_class)
    assert loss.item() == pytest.approx(reference_loss(student, teacher, mask=per_class).item(), rel=1e-10)


def test_normalizer():
    student, teacher = _pair(torch.float32)
    _, stats = adaptive_distillation_loss(student, teacher, return_stats=True)
    expected = torch.sigmoid(teacher.double()).pow(1.8).sum().clamp_min(1.0)
    # fp32 terms (sigmoid, log, exp: a few roundings each) summed against the float64 sum
    assert stats["normalizer"].item() == pytest.approx(expected.item(), rel=sum_rtol(teacher.numel(), ops_per_term=8))

    # Confident background everywhere: the soft positive count is ~0 and the normaliser is clamped to 1.
    _, stats = adaptive_distillation_loss(student, torch.full_like(teacher, -20.0), return_stats=True)
    assert stats["normalizer"].item() == 1.0

    plain_sum = adaptive_distillation_loss(student, teacher, normalizer="none")
    for value in (5.0, 5, torch.tensor(5.0), torch.tensor([5.0])):
        divided = adaptive_distillation_loss(student, teacher, normalizer=value)
        torch.testing.assert_close(divided * 5, plain_sum, rtol=4 * EPS32, atol=0)  # one division, one product


def test_temperature():
    student, teacher = _pair(torch.float32)
    temp = 2.5
    loss, grad = _loss_and_grad(adaptive_distillation_loss, student, teacher, temperature=temp, normalizer=1.0)
    loss1, grad1 = _loss_and_grad(adaptive_distillation_loss, student / temp, teacher / temp, normalizer=1.0)
    # Dividing inside the loss or before it rounds each logit differently (a few ulps, amplified by the ~20 ops of
    # an entry); the sums then add their own rounding.
    rtol = sum_rtol(student.numel(), ops_per_term=20)
    torch.testing.assert_close(loss, loss1 * temp**2, rtol=rtol, atol=0)
    # chain rule: d(s / T) / ds = 1 / T; entries near 0 are differences of O(1) terms, hence atol against the largest
    torch.testing.assert_close(grad, grad1 * temp, rtol=rtol, atol=rtol * grad.abs().max().item())

    _, stats = adaptive_distillation_loss(student, teacher, temperature=temp, return_stats=True)
    expected = torch.sigmoid(teacher.double() / temp).pow(1.8).sum().clamp_min(1.0)
    assert stats["normalizer"].item() == pytest.approx(expected.item(), rel=sum_rtol(teacher.numel(), ops_per_term=8))


def test_detach_weight_changes_gradient_not_value():
    student, teacher = _pair(torch.float32)
    loss, grad = _loss_and_grad(adaptive_distillation_loss, student, teacher)
    loss_d, grad_d = _loss_and_grad(adaptive_distillation_loss, student, teacher, detach_weight=True)
    assert loss.item() == loss_d.item()
    assert (grad - grad_d).abs().max() > 1e-3 * grad.abs().max()


@pytest.mark.parametrize(
    "fn,kwargs",
    [
        (kl_distillation_loss, {}),
        (focal_distillation_loss, {"gamma": 0.5}),
        (adaptive_distillation_loss, {}),
        (adaptive_distillation_loss, {"gamma": 0.5, "beta": 0.5}),
        (adaptive_distillation_loss, {"variant": "released"}),
        (adaptive_distillation_loss, {"variant": "released", "gamma": 0.5}),
    ],
)
def test_saturated_logits_are_finite(fn, kwargs):
    values = torch.tensor([-100.0, -30.0, 0.0, 30.0, 100.0])
    student = values.repeat_interleave(5).reshape(1, 25, 1).expand(1, 25, 3).clone()
    teacher = values.repeat(5).reshape(1, 25, 1).expand(1, 25, 3).clone()
    assert (torch.sigmoid(teacher) == 0).any() and (torch.sigmoid(teacher) == 1).any()  # q exactly 0 and 1
    loss, grad = _loss_and_grad(fn, student, teacher, **kwargs)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert loss > 0
    if fn is kl_distillation_loss:
        # Independent float64 value from log-sigmoids (finite where the naive formula is 0 * log 0).
        ls = torch.nn.functional.logsigmoid
        s64, t64 = student.double(), teacher.double()
        q = torch.sigmoid(t64)
        kl = q * (ls(t64) - ls(s64)) + (1 - q) * (ls(-t64) - ls(-s64))
        expected = (kl.sum() / (q**1.8).sum()).item()
        assert loss.item() == pytest.approx(expected, rel=sum_rtol(student.numel(), ops_per_term=20))
        assert grad[student == teacher].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype: torch.dtype):
    student, teacher = _pair(dtype)
    loss, grad = _loss_and_grad(adaptive_distillation_loss, student, teacher)
    loss32, grad32 = _loss_and_grad(adaptive_distillation_loss, student.float(), teacher.float())
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    # the same fp32 computation on the same values; only the vectorised summation may split differently
    torch.testing.assert_close(loss, loss32, rtol=sum_rtol(student.numel()), atol=0)
    torch.testing.assert_close(grad.float(), grad32, rtol=1e-2, atol=1e-3 * grad32.abs().max().item())


def test_autocast_bf16():
    features = _logits(B, N, 8, dtype=torch.float32)
    head_s, head_t = torch.nn.Linear(8, C), torch.nn.Linear(8, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student, teacher = head_s(features), head_t(features) * 4
        assert student.dtype == torch.bfloat16
        loss = adaptive_distillation_loss(student, teacher)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(head_s.weight.grad).all()
    expected = adaptive_distillation_loss(student.detach().float(), teacher.detach().float())
    torch.testing.assert_close(loss.detach(), expected, rtol=sum_rtol(student.numel()), atol=0)


def test_return_stats():
    student, teacher = _pair()
    mask = torch.rand(B, N, generator=torch.Generator().manual_seed(4)) > 0.3
    loss, stats = adaptive_distillation_loss(
        student.requires_grad_(), teacher, mask=mask, gamma=1.5, beta=0.5, return_stats=True
    )
    assert set(stats) == {"normalizer", "mean_weight"}
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())
    s, t = student.detach(), teacher
    p, q = torch.sigmoid(s), torch.sigmoid(t)
    kl = q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))
    entropy = -(q * torch.log(q) + (1 - q) * torch.log(1 - q))
    weight = (1 - torch.exp(-(kl + 0.5 * entropy))) ** 1.5
    assert stats["mean_weight"].item() == pytest.approx(weight[mask].mean().item(), rel=1e-10)
    assert stats["normalizer"].item() == pytest.approx(max(1.0, (q[mask] ** 1.8).sum().item()), rel=1e-10)

    _, kl_stats = kl_distillation_loss(student, teacher, return_stats=True)
    assert kl_stats["mean_weight"].item() == 1.0


def test_teacher_gets_no_gradient():
    student, teacher = _pair(torch.float32)
    student.requires_grad_()
    teacher.requires_grad_()
    adaptive_distillation_loss(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None


def test_chunking_is_invisible(monkeypatch: pytest.MonkeyPatch):
    student, teacher = _pair(torch.float32, shape=(3, 40, 6))
    mask = torch.rand(3, 40, generator=torch.Generator().manual_seed(5)) > 0.2
    kwargs = {"mask": mask, "return_stats": True}
    (loss, stats), grad = _stats_and_grad(student, teacher, **kwargs)
    monkeypatch.setattr(losses, "_CHUNK_NUMEL_CPU", 25)  # 4 rows per chunk, 30 chunks
    (loss_c, stats_c), grad_c = _stats_and_grad(student, teacher, **kwargs)
    # Chunks change only the order of the sums (of 720 entries): the loss, the normaliser and, through the
    # normaliser, every gradient entry.
    rtol = sum_rtol(student.numel())
    torch.testing.assert_close(loss_c, loss, rtol=rtol, atol=0)
    torch.testing.assert_close(stats_c, stats, rtol=rtol, atol=0)
    torch.testing.assert_close(grad_c, grad, rtol=rtol, atol=0)


def _stats_and_grad(student, teacher, **kwargs):
    student = student.clone().requires_grad_()
    loss, stats = adaptive_distillation_loss(student, teacher, **kwargs)
    (grad,) = torch.autograd.grad(loss, student)
    return (loss.detach(), stats), grad


def test_backward_twice_and_no_grad():
    student, teacher = _pair(torch.float32)
    student.requires_grad_()
    loss = adaptive_distillation_loss(student, teacher)
    loss.backward(retain_graph=True)
    first = student.grad.clone()
    loss.backward()  # the second pass recomputes the gradient
    torch.testing.assert_close(student.grad, 2 * first, rtol=1e-6, atol=0)

    with torch.no_grad():
        torch.testing.assert_close(adaptive_distillation_loss(student, teacher), loss.detach(), rtol=0, atol=0)


def test_empty_input():
    student = torch.zeros(2, 0, C, requires_grad=True)
    loss = adaptive_distillation_loss(student, torch.zeros(2, 0, C))
    loss.backward()
    assert loss.item() == 0.0 and student.grad.shape == student.shape


def test_sync_normalizer(tmp_path):
    import torch.distributed as dist

    student, teacher = _pair(torch.float32)
    local = adaptive_distillation_loss(student, teacher)
    assert adaptive_distillation_loss(student, teacher, sync_normalizer=True).item() == local.item()  # no-op

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        synced = adaptive_distillation_loss(student, teacher, sync_normalizer=True)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(synced, local, rtol=0, atol=0)  # the mean over one process is the value itself


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"teacher_logits": torch.zeros(B, N, C + 1)}, "same shape"),
        ({"variant": "caffe2"}, "variant"),
        ({"gamma": -1.0}, "gamma"),
        ({"beta": -0.5}, "beta"),
        ({"temperature": 0.0}, "temperature"),
        ({"normalizer": "mean"}, "normalizer"),
        ({"normalizer": -2.0}, "normalizer"),
        ({"normalizer": torch.ones(2)}, "normalizer"),
        ({"normalizer": None}, "normalizer"),
        ({"mask": torch.ones(B, N + 1, dtype=torch.bool)}, "mask"),
        ({"mask": torch.ones(B, N)}, "bool"),
        ({"alpha": 1.5}, "alpha"),
    ],
)
def test_bad_inputs(kwargs: dict, match: str):
    args = {"student_logits": torch.zeros(B, N, C), "teacher_logits": torch.zeros(B, N, C)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        adaptive_distillation_loss(args.pop("student_logits"), args.pop("teacher_logits"), **args)


def test_kl_value_on_known_entry():
    # One entry, q = 0.5, p = sigmoid(0) ... KL(0.5 || sigmoid(2)) by hand.
    p = 1 / (1 + math.exp(-2.0))
    expected = 0.5 * math.log(0.5 / p) + 0.5 * math.log(0.5 / (1 - p))
    loss = kl_distillation_loss(torch.tensor([[2.0]]), torch.tensor([[0.0]]), normalizer="none")
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def _synced_values(rank: int, store: str, results: dict) -> None:
    """One process of `test_normalisers_are_averaged_over_processes`: its own logits, the synced ADL value and the
    synced positive count of the supervised loss."""
    import torch.distributed as dist

    from hf_sad.model.box_ops import AnchorAssignment
    from hf_sad.model.detection_loss import num_positives

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        student, teacher = _logits(B, N, C, seed=10 + rank, dtype=torch.float32), _logits(B, N, C, seed=20 + rank,
                                                                                          dtype=torch.float32)
        labels = torch.zeros(1, 10, dtype=torch.long)
        labels[0, : 3 + 4 * rank] = 1  # 3 positives on rank 0, 7 on rank 1
        results[rank] = (adaptive_distillation_loss(student, teacher, sync_normalizer=True).item(),
                         float(num_positives(AnchorAssignment(labels, labels.clone()), sync=True)),
                         # by default each process divides by its own count
                         [fn(student, teacher).item() for fn in (adaptive_distillation_loss, kl_distillation_loss,
                                                                 focal_distillation_loss)])
    finally:
        dist.destroy_process_group()


def test_normalisers_are_averaged_over_processes(tmp_path):
    """Two processes: each divides its own sum by the mean of the two soft counts (ADL's adaptive normaliser) and by
    the mean of the two positive counts (the supervised losses'), not by its own or their sum."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_synced_values, args=(str(tmp_path / "store"), results), nprocs=2)
    counts = []
    for rank in range(2):
        student, teacher = _logits(B, N, C, seed=10 + rank, dtype=torch.float32), _logits(B, N, C, seed=20 + rank,
                                                                                          dtype=torch.float32)
        counts.append(float((torch.sigmoid(teacher.double()) ** 1.8).sum()))
    for rank in range(2):
        student, teacher = _logits(B, N, C, seed=10 + rank, dtype=torch.float32), _logits(B, N, C, seed=20 + rank,
                                                                                          dtype=torch.float32)
        own_sum = adaptive_distillation_loss(student, teacher, normalizer="none").item()
        assert results[rank][0] == pytest.approx(own_sum / (sum(counts) / 2), rel=1e-5)
        assert results[rank][1] == 5.0  # (3 + 7) / 2
        assert results[rank][2] == pytest.approx([fn(student, teacher).item() for fn in (
            adaptive_distillation_loss, kl_distillation_loss, focal_distillation_loss)], rel=1e-6)
        assert results[rank][2][0] == pytest.approx(own_sum / counts[rank], rel=1e-5)


def test_argument_boundaries():
    """alpha 0 and 1, any positive power and 1-d logits (one entry's classes) are accepted; a normaliser of 0, a power
    of 0, integer logits and 0-d logits are not."""
    student, teacher = _pair(torch.float32)
    for kwargs in ({"alpha": 0.0, "variant": "released"}, {"alpha": 1.0, "variant": "released"}, {"power": 0.5}):
        assert torch.isfinite(adaptive_distillation_loss(student, teacher, **kwargs))
    assert torch.isfinite(adaptive_distillation_loss(student[0, 0], teacher[0, 0]))
    for kwargs, match in (({"normalizer": 0.0}, "normalizer"), ({"power": 0.0}, "power")):
        with pytest.raises(ValueError, match=match):
            adaptive_distillation_loss(student, teacher, **kwargs)
    with pytest.raises(ValueError, match="floating point"):
        adaptive_distillation_loss(student, teacher.long())
    with pytest.raises(ValueError, match="trailing class dimension"):
        adaptive_distillation_loss(torch.tensor(0.5), torch.tensor(0.5))


def test_masks_per_class_count_entries_and_give_the_same_gradient_as_the_reference():
    """A full (..., C) mask selects single entries: the loss, its gradient (ADL's weight and target), the normaliser
    and the mean weight are those of the selected entries, also with two classes and one included entry."""
    student, teacher = _pair(torch.float64, shape=(B, N, 2))
    mask = torch.rand(B, N, 2, generator=torch.Generator().manual_seed(5)) > 0.5
    loss, grad = _loss_and_grad(adaptive_distillation_loss, student, teacher, mask=mask)
    ref_loss, ref_grad = _loss_and_grad(reference_loss, student, teacher, mask=mask)
    assert _rel_err(loss, ref_loss) < 1e-9 and _rel_err(grad, ref_grad) < 1e-9
    _, stats = adaptive_distillation_loss(student, teacher, mask=mask, return_stats=True)
    s, t = student.double(), teacher.double()
    q, p = torch.sigmoid(t), torch.sigmoid(s)
    kl = q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))
    entropy = -(q * torch.log(q) + (1 - q) * torch.log(1 - q))
    weight = (1 - torch.exp(-(kl + entropy))) ** 2
    assert stats["mean_weight"].item() == pytest.approx(weight[mask].mean().item(), rel=1e-9)
    single = torch.zeros_like(mask)
    single[0, 0, 1] = True
    _, stats = adaptive_distillation_loss(student, teacher, mask=single, return_stats=True)
    assert stats["mean_weight"].item() == pytest.approx(weight[0, 0, 1].item(), rel=1e-9)
    assert stats["normalizer"].item() == 1.0  # one soft count below 1: clamped


def test_temperature_halves_and_a_tensor_normaliser_keeps_the_loss_dtype():
    student, teacher = _pair(torch.float32)
    for temperature in (0.5, 2.0):
        got = adaptive_distillation_loss(student, teacher, temperature=temperature)
        expected = reference_loss(student.double(), teacher.double(), temperature=temperature)
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert adaptive_distillation_loss(student, teacher, normalizer=torch.tensor(3.0, dtype=torch.float64)).dtype == (
        torch.float32)


def test_baselines_pass_their_options_on():
    """focal distillation: its gamma, a detached weight (another gradient, the same value) and stats; KL: none of
    ADL's weighting whatever beta the kernel would take."""
    student, teacher = _pair(torch.float32)
    plain, grad = _loss_and_grad(focal_distillation_loss, student, teacher)
    detached, detached_grad = _loss_and_grad(focal_distillation_loss, student, teacher, detach_weight=True)
    torch.testing.assert_close(plain, detached)
    assert not torch.allclose(grad, detached_grad)
    loss, stats = focal_distillation_loss(student, teacher, return_stats=True)
    assert set(stats) == {"normalizer", "mean_weight"} and torch.equal(loss, plain)
    torch.testing.assert_close(kl_distillation_loss(student, teacher),
                               adaptive_distillation_loss(student, teacher, gamma=0.0, beta=0.0))


@pytest.mark.parametrize("gamma", [0.5, 1.5])
def test_fractional_gamma_is_finite_for_saturated_logits(gamma):
    values = torch.tensor([-100.0, -30.0, 0.0, 30.0, 100.0])
    student = values.repeat_interleave(5).reshape(1, 25, 1).expand(1, 25, 3).clone()
    teacher = values.repeat(5).reshape(1, 25, 1).expand(1, 25, 3).clone()
    for variant in ("paper", "released"):
        loss, grad = _loss_and_grad(adaptive_distillation_loss, student, teacher, gamma=gamma, variant=variant)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), variant


def test_low_precision_student_gets_a_gradient_in_its_dtype():
    student, teacher = _pair(torch.bfloat16)
    loss, grad = _loss_and_grad(adaptive_distillation_loss, student, teacher.float())
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all() and loss.dtype == torch.float32


def test_binary_entropy_matches_the_definition_and_is_finite_when_saturated():
    from hf_sad.distillation.losses import binary_entropy

    z = torch.linspace(-30, 30, 301, dtype=torch.float64)
    q = torch.sigmoid(z)
    expected = -(q * q.log() + (1 - q) * (1 - q).log())
    torch.testing.assert_close(binary_entropy(z.float()).double(), expected, atol=32 * EPS32, rtol=0)
    assert binary_entropy(torch.tensor([0.0])).item() == pytest.approx(math.log(2))
    assert torch.isfinite(binary_entropy(torch.tensor([-1e4, 1e4]))).all()
    assert binary_entropy(torch.tensor([0.0], dtype=torch.bfloat16)).dtype == torch.float32


def test_every_tensor_the_kernels_make_is_on_their_inputs_device():
    from .utils import under_meta_default_device

    student, teacher = _pair(torch.float32)
    mask = torch.rand(B, N, generator=torch.Generator().manual_seed(3)) > 0.3
    normalizer = torch.tensor(3.0)
    for kwargs in ({}, {"mask": mask, "normalizer": normalizer}, {"variant": "released"}):
        def loss(s, t, kwargs=kwargs):
            return adaptive_distillation_loss(s, t, return_stats=True, **kwargs)[0]

        expected = _loss_and_grad(loss, student, teacher)
        with under_meta_default_device():
            got = _loss_and_grad(loss, student, teacher)
        for a, b in zip(got, expected):
            assert a.device.type == "cpu" and torch.equal(a, b), kwargs
