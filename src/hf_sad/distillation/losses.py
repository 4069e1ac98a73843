"""Distillation losses for dense (anchor x class) sigmoid detectors: Adaptive Distillation Loss (ADL) and baselines.

ADL (Tang et al., "Learning Efficient Detector with Semi-supervised Adaptive Distillation", arXiv 1901.00366) distils a
RetinaNet teacher into a student entry by entry (anchor, class), with Bernoulli outputs `q = sigmoid(teacher / T)` and
`p = sigmoid(student / T)`. Like focal loss, it re-weights every entry so that the many easy background entries do not
dominate, here with the adaptive distillation weight

    ADW = (1 - exp(-(KL(q || p) + beta * H(q)))) ** gamma

which is large for entries that are hard to mimic (large KL) or hard to learn (teacher entropy `H(q)` high). The loss
is `T**2 * sum(ADW * KL) / N` with the "adaptive" normaliser `N = max(1, sum(q ** 1.8))`, a soft count of teacher
positives that also exists on unlabeled images. `variant="released"` reproduces what the authors' Caffe2 operator
computes instead (ADW times an alpha-balanced soft-target cross-entropy).

No library ships ADL, so it is written here. It runs on every (anchor, class) entry of every image: about 49M entries
for a batch of 8 COCO images, where a plain autograd formula keeps a dozen full-size fp32 temporaries alive for the
backward pass (GBs) and spends most of its time writing them. The loss is therefore a custom
`torch.autograd.Function`: it walks the entries in cache-sized chunks and, while the per-entry terms are at hand,
also writes the closed-form gradient w.r.t. the student logits into one buffer, which backward only scales and hands
over as `.grad`. The gradient is the only full-size allocation; nothing is recomputed (about 5x faster and 10x less
memory than the plain formula at COCO size on CPU, see bench/bench_losses.py). Everything is computed in fp32 (fp64
for fp64 inputs, e.g. for `gradcheck`) from the logits through softplus / sigmoid, never log(0): finite for saturated
logits (q exactly 0 or 1) and for bf16/fp16 inputs or autocast.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "ADL_VARIANTS",
    "adaptive_distillation_loss",
    "binary_entropy",
    "focal_distillation_loss",
    "kl_distillation_loss",
]

#: ADL's variants: the paper's (weight x KL) and the authors' released operator (weight x soft cross-entropy).
ADL_VARIANTS = ("paper", "released")
# The normalisers the kernels compute themselves; `hf_sad.distillation.sad_loss` passes others as tensors.
_NORMALIZERS = ("adaptive", "none")
# Entries per chunk. On CPU a chunk's temporaries (1 MiB each) should stay in cache while the chunk is big enough to
# amortise per-op dispatch and thread wake-ups (measured best at 2**17-2**18); on accelerators chunks only bound
# memory, so they are large to keep kernel launches few.
_CHUNK_NUMEL_CPU = 1 << 18
_CHUNK_NUMEL_ACCELERATOR = 1 << 23


class _Spec(NamedTuple):
    """Static settings of one loss evaluation (everything but the tensors)."""

    beta: float
    gamma: float
    inv_temperature: float
    released: bool
    alpha: float
    detach_weight: bool
    power: float | None  # exponent of the adaptive normaliser, None when it is not needed
    need_weight_sum: bool
    compute_dtype: torch.dtype


def _softplus(x: Tensor) -> Tensor:
    """log(1 + exp(x)) = -log(1 - sigmoid(x)), finite and accurate for any finite x (cheaper than F.softplus on CPU)."""
    positive_part = x.clamp_min(0.0)
    # log1p(exp(-|x|)) + max(x, 0), with -|x| = x - 2 max(x, 0) (one op less than abs + neg)
    return torch.sub(x, positive_part, alpha=2.0).exp_().log1p_().add_(positive_part)


def binary_entropy(logits: Tensor) -> Tensor:
    """H(q) = -(q log q + (1 - q) log(1 - q)) in nats of q = sigmoid(`logits`), elementwise, in float32 from the
    logits: q softplus(-z) + (1 - q) softplus(z), finite (-> 0) for saturated probabilities."""
    z = logits.float()
    q = torch.sigmoid(z)
    return q * _softplus(-z) + (1 - q) * _softplus(z)


def _weight(one_minus_e: Tensor, gamma: float) -> Tensor:
    """ADW = (1 - e) ** gamma, with e = exp(-(KL + beta * H))."""
    if gamma == 1.0:
        return one_minus_e
    if gamma == 2.0:
        return one_minus_e.square()
    return one_minus_e.pow(gamma)


def _weight_slope(e: Tensor, one_minus_e: Tensor, gamma: float) -> Tensor:
    """d ADW / d (KL + beta * H) = gamma * e * (1 - e) ** (gamma - 1), finite everywhere (a new tensor)."""
    if gamma == 1.0:
        return e.clone()
    if gamma == 2.0:
        return torch.mul(e, one_minus_e).mul_(2.0)
    if gamma < 1.0:
        # (1 - e) ** (gamma - 1) diverges at 1 - e == 0, where it multiplies a KL (or a KL slope) that is 0.
        one_minus_e = one_minus_e.clamp_min(torch.finfo(one_minus_e.dtype).tiny)
    return one_minus_e.pow(gamma - 1.0).mul_(e).mul_(gamma)


def _masked_sum(x: Tensor, mask: Tensor | None, y: Tensor | None = None) -> Tensor:
    """sum(x * y * mask) over a chunk; `mask` is a float (rows, 1) or (rows, C) tensor, `y` defaults to 1."""
    # Tensor.sum (cascade summation), not torch.dot: an fp32 dot over 1e5 terms is off by ~1e-5 relative.
    if y is not None:
        x = x * y
    if mask is None:
        return x.sum()
    if mask.shape[1] == 1:
        return x.sum(1).mul_(mask.reshape(-1)).sum()
    return x.mul_(mask).sum() if y is not None else (x * mask).sum()


def _chunk_kernel(
    student: Tensor, teacher: Tensor, mask: Tensor | None, spec: _Spec, grad_out: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss terms of one chunk of entries, and their gradient when asked.

    Args:
        student, teacher: (rows, C) raw logits, any float dtype.
        mask: (rows, 1) or (rows, C) bool, True = included, or None.
        grad_out: (rows, C) tensor that receives d(loss sum) / d student for an upstream gradient of 1, or None.

    Returns:
        0-dim tensors in the compute dtype: sum of ADW * target, sum of ADW (0 unless `spec.need_weight_sum`), sum of
        q ** power (0 unless `spec.power`), all over the included entries.
    """
    s = student.to(spec.compute_dtype)
    t = teacher.to(spec.compute_dtype)
    if spec.inv_temperature != 1.0:
        s = s * spec.inv_temperature
        t = t * spec.inv_temperature
    maskf = None if mask is None else mask.to(spec.compute_dtype)
    # Every log below is a softplus of a finite logit: -log(1 - p) = softplus(s), -log p = softplus(s) - s, and the
    # same for q. Nothing is log(0), so q == 0 or 1 (saturated logits) gives finite values and gradients. The
    # expressions are rearranged to need as few full-size ops as possible: the loss is a long chain of cheap
    # element-wise ops, whose count sets its speed once the chunk sits in cache.
    sp_s, sp_t = _softplus(s), _softplus(t)
    q = torch.sigmoid(t)
    # KL = q log(q/p) + (1-q) log((1-q)/(1-p)) = (log(1-q) - log(1-p)) + q (t - s), since log q - log(1-q) = t.
    # Exact where most entries are (background, q ~ 0); for confident positives its error is ~eps absolute.
    kl = (sp_s - sp_t).addcmul_(q, t - s)
    if spec.released:
        # CE_alpha = alpha q (sp_s - s) + (1 - alpha) (1 - q) sp_s
        target = (q * (2.0 * spec.alpha - 1.0)).add_(1.0 - spec.alpha).mul_(sp_s).addcmul_(q, s, value=-spec.alpha)
    else:
        target = kl

    zero = q.new_zeros(())
    weight = e = one_minus_e = None
    if spec.gamma != 0.0:
        if spec.beta == 1.0:  # -(KL + H) = -CE = q s - softplus(s)
            neg_exponent = (q * s).sub_(sp_s)
        elif spec.beta != 0.0:  # -H = q t - softplus(t)
            neg_exponent = (q * t).sub_(sp_t).mul_(spec.beta).sub_(kl)
        else:
            neg_exponent = kl.neg()
        if spec.gamma < 1.0:
            # The slope's (1 - e) ** (gamma - 1) needs 1 - e to full relative precision near 0.
            one_minus_e = torch.expm1(neg_exponent).neg_()
            e = neg_exponent.exp_()
        else:
            e = neg_exponent.exp_()
            one_minus_e = 1.0 - e
        if spec.gamma not in (1.0, 2.0):
            # Rounding can make the exponent a hair negative; (negative) ** gamma would be NaN.
            one_minus_e.clamp_min_(0.0)
        weight = _weight(one_minus_e, spec.gamma)
    loss_sum = _masked_sum(target, maskf, weight)
    weight_sum = _masked_sum(weight, maskf) if spec.need_weight_sum and weight is not None else zero
    # q ** power = exp(power * log q), log q = t - softplus(t); pow() would cost several times more.
    qpow_sum = zero if spec.power is None else _masked_sum((t - sp_t).mul_(spec.power).exp_(), maskf)

    if grad_out is not None:
        p = torch.sigmoid(s)
        dkl = p - q  # d KL / d s, with s = student / T
        if spec.released:
            # d CE_alpha / d s = (1 - alpha) (1 - q) p - alpha q (1 - p)
            dtarget = (q * p).mul_(2.0 * spec.alpha - 1.0).add_(p, alpha=1.0 - spec.alpha).sub_(q, alpha=spec.alpha)
        else:
            dtarget = dkl
        if weight is None:  # ADW == 1
            base, factor = dtarget, None
        elif spec.detach_weight:
            base, factor = dtarget, weight
        elif spec.released:
            # W dCE/ds + CE dW/ds; the weight's exponent moves with KL only (H(q) does not depend on s).
            # (slope * dKL first: for gamma < 1 the slope is large exactly where dKL is small.)
            slope = _weight_slope(e, one_minus_e, spec.gamma)
            base, factor = slope.mul_(dkl).mul_(target).addcmul_(dtarget, weight), None
        else:
            # d(W KL)/ds = (W + KL dW/dexponent) dKL/ds
            base, factor = dkl, _weight_slope(e, one_minus_e, spec.gamma).mul_(kl).add_(weight)
        if maskf is not None:
            factor = maskf if factor is None else factor.mul_(maskf)
        _store_product(grad_out, base, factor)
    return loss_sum, weight_sum, qpow_sum


def _store_product(out: Tensor, a: Tensor, b: Tensor | None) -> None:
    """out = a * b (b may be None), written straight into `out` when the dtypes allow."""
    if b is None:
        out.copy_(a)
    elif out.dtype == a.dtype:
        torch.mul(a, b, out=out)
    else:
        out.copy_(a * b)


def _row_chunks(rows: int, cols: int, device: torch.device) -> list[slice]:
    # Mutation testing: the chunk size sets speed and memory, not values (next line too).
    numel = _CHUNK_NUMEL_CPU if device.type == "cpu" else _CHUNK_NUMEL_ACCELERATOR  # pragma: no mutate
    # Mutation testing: see above.
    step = max(1, numel // max(cols, 1))  # pragma: no mutate
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _run_chunks(
    student: Tensor, teacher: Tensor, mask: Tensor | None, spec: _Spec, grad_out: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """`_chunk_kernel` over all rows; returns the three sums (0-dim, compute dtype)."""
    chunks = _row_chunks(student.shape[0], student.shape[1], student.device)
    # Preallocated: partial results that outlived their chunk would pin freed heap blocks and make the CPU heap grow
    # by about one chunk-sized block per chunk.
    partials = torch.zeros(len(chunks), 3, dtype=spec.compute_dtype, device=student.device)
    # Mutation testing: elementwise ops are never autocast.
    with torch.autocast(student.device.type, enabled=False):  # pragma: no mutate
        for i, r in enumerate(chunks):
            chunk_mask = None if mask is None else mask[r]
            chunk_grad = None if grad_out is None else grad_out[r]
            torch.stack(_chunk_kernel(student[r], teacher[r], chunk_mask, spec, chunk_grad), out=partials[i])
    return tuple(partials.sum(0).unbind())


class _DistillationSum(torch.autograd.Function):
    """Sum over included entries of the weighted per-entry loss, with the sums the normaliser and stats need.

    Inputs: (M, C) logits of any float dtype, an optional (M, 1) or (M, C) bool mask and a `_Spec`. Outputs: 0-dim
    tensors in the compute dtype: the loss sum (differentiable w.r.t. the student logits only), the sum of ADW and
    the sum of q ** power.

    The gradient is computed in the forward pass, chunk by chunk, from the terms the loss needs anyway, into one
    buffer that backward scales in place and hands over (it becomes `.grad` without a copy). So nothing but that
    buffer is kept between forward and backward, and nothing is recomputed. A second backward through the same graph
    (`retain_graph=True`, gradcheck) recomputes the gradient from the saved inputs.
    """

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, mask: Tensor | None, spec: _Spec):
        grad = torch.empty_like(student, memory_format=torch.contiguous_format) if ctx.needs_input_grad[0] else None
        loss_sum, weight_sum, qpow_sum = _run_chunks(student, teacher, mask, spec, grad)
        ctx.save_for_backward(student, teacher, mask)
        ctx.spec = spec
        # Mutation testing: without it, backward recomputes the same gradient (slower).
        ctx.grad = grad  # pragma: no mutate
        # Mutation testing: no gradient reaches these outputs either way.
        ctx.mark_non_differentiable(weight_sum, qpow_sum)  # pragma: no mutate
        return loss_sum, weight_sum, qpow_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, *unused: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        spec: _Spec = ctx.spec
        grad, ctx.grad = ctx.grad, None  # drop our reference so autograd can take the buffer as .grad
        if grad is None:
            student, teacher, mask = ctx.saved_tensors
            grad = torch.empty_like(student, memory_format=torch.contiguous_format)
            _run_chunks(student, teacher, mask, spec, grad)
        # d s / d student = 1 / T
        grad.mul_(grad_loss * spec.inv_temperature)
        return grad, None, None, None


def _as_2d_mask(mask: Tensor | None, shape: torch.Size) -> Tensor | None:
    """A leading-dims or full-shape bool mask as (M, 1) (the same for every class) or (M, C)."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = included), got dtype {mask.dtype}.")
    if mask.dim() < len(shape):
        mask = mask.unsqueeze(-1)  # a mask over the leading dims applies to every class
    # Mutation testing: an expanded (rows, C) mask selects the same entries (slower).
    per_row = mask.shape[-1] == 1  # pragma: no mutate
    # Mutation testing: as above.
    target = (*shape[:-1], 1) if per_row else tuple(shape)  # pragma: no mutate
    try:
        mask = torch.broadcast_to(mask, target)
    except RuntimeError as err:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the logits' leading dims {tuple(shape[:-1])} "
            f"(or to their full shape {tuple(shape)})."
        ) from err
    return mask.reshape(-1, target[-1])


def _included_count(mask_2d: Tensor | None, shape: torch.Size, like: Tensor) -> Tensor:
    """Number of included entries, a 0-dim tensor like `like`."""
    if mask_2d is None:
        return torch.full_like(like, float(shape.numel()))
    # Mutation testing: an integer count divides alike.
    count = mask_2d.sum(dtype=like.dtype)  # pragma: no mutate
    return count * shape[-1] if mask_2d.shape[1] == 1 else count


def _all_reduce_mean(value: Tensor) -> Tensor:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    value = value.detach().clone()
    # Mutation testing: SUM is all_reduce's default.
    dist.all_reduce(value, op=dist.ReduceOp.SUM)  # pragma: no mutate
    return value / dist.get_world_size()


def _resolve_normalizer(normalizer: str | float | Tensor, qpow_sum: Tensor, sync: bool) -> Tensor:
    """The (detached, 0-dim) value the loss sum is divided by."""
    if isinstance(normalizer, Tensor):
        value = normalizer.detach().to(device=qpow_sum.device, dtype=qpow_sum.dtype).reshape(())
    elif isinstance(normalizer, str):
        value = qpow_sum if normalizer == "adaptive" else torch.ones_like(qpow_sum)
    else:
        value = torch.full_like(qpow_sum, float(normalizer))
    if sync:
        value = _all_reduce_mean(value)
    if isinstance(normalizer, str) and normalizer == "adaptive":
        value = value.clamp_min(1.0)
    return value


def _check_args(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float,
    gamma: float,
    temperature: float,
    normalizer: str | float | Tensor,
    power: float,
    variant: str,
    alpha: float,
) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} must "
            "have the same shape: teacher and student need identical levels, anchors and classes."
        )
    if student_logits.dim() < 1:
        raise ValueError("logits need a trailing class dimension, got a 0-dim tensor.")
    if not (student_logits.is_floating_point() and teacher_logits.is_floating_point()):
        raise ValueError(f"logits must be floating point, got {student_logits.dtype} and {teacher_logits.dtype}.")
    if variant not in ADL_VARIANTS:
        raise ValueError(f"variant must be one of {ADL_VARIANTS}, got {variant!r}.")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}.")
    if beta < 0:
        raise ValueError(f"beta must be >= 0 (the paper's sense: weight of the teacher entropy), got {beta}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    if power <= 0:
        raise ValueError(f"power must be > 0, got {power}.")
    if isinstance(normalizer, str):
        if normalizer not in _NORMALIZERS:
            raise ValueError(
                f"normalizer must be one of {_NORMALIZERS}, a positive number or a tensor, got {normalizer!r}."
            )
    elif isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"a tensor normalizer must hold one value, got shape {tuple(normalizer.shape)}.")
    elif not isinstance(normalizer, (int, float)) or isinstance(normalizer, bool) or not normalizer > 0:
        raise ValueError(f"normalizer must be 'adaptive', 'none', a positive number or a tensor, got {normalizer!r}.")


def _distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float,
    gamma: float,
    temperature: float,
    normalizer: str | float | Tensor,
    power: float,
    mask: Tensor | None,
    variant: str,
    alpha: float,
    detach_weight: bool,
    sync_normalizer: bool,
    return_stats: bool,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """The core every public loss calls; see `adaptive_distillation_loss` for the arguments."""
    _check_args(
        student_logits, teacher_logits, beta=beta, gamma=gamma, temperature=temperature, normalizer=normalizer,
        power=power, variant=variant, alpha=alpha,
    )
    shape = student_logits.shape
    use_fp64 = torch.float64 in (student_logits.dtype, teacher_logits.dtype)
    spec = _Spec(
        beta=float(beta),
        gamma=float(gamma),
        inv_temperature=1.0 / float(temperature),
        released=variant == "released",
        alpha=float(alpha),
        detach_weight=bool(detach_weight),
        # Mutation testing: it only saves computing a sum nothing reads.
        power=float(power) if isinstance(normalizer, str) and normalizer == "adaptive" else None,  # pragma: no mutate
        need_weight_sum=return_stats,
        compute_dtype=torch.float64 if use_fp64 else torch.float32,
    )
    mask_2d = _as_2d_mask(mask, shape)
    loss_sum, weight_sum, qpow_sum = _DistillationSum.apply(
        student_logits.reshape(-1, shape[-1]), teacher_logits.detach().reshape(-1, shape[-1]), mask_2d, spec
    )
    norm = _resolve_normalizer(normalizer, qpow_sum, sync_normalizer)
    loss = loss_sum / norm * float(temperature) ** 2
    if not return_stats:
        return loss
    count = _included_count(mask_2d, shape, loss_sum)
    mean_weight = torch.ones_like(loss_sum) if gamma == 0 else weight_sum / count.clamp_min(1.0)
    return loss, {"normalizer": norm.detach(), "mean_weight": mean_weight.detach()}


def adaptive_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 2.0,
    temperature: float = 1.0,
    normalizer: str | float | Tensor = "adaptive",
    power: float = 1.8,
    mask: Tensor | None = None,
    variant: str = "paper",
    alpha: float = 0.5,
    detach_weight: bool = False,
    sync_normalizer: bool = False,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    r"""Adaptive Distillation Loss between sigmoid classification logits of a student and its teacher.

    Per entry (anchor, class), with `q = sigmoid(teacher / T)`, `p = sigmoid(student / T)`, the binary
    `KL = q log(q/p) + (1-q) log((1-q)/(1-p))` and the teacher entropy `H = -(q log q + (1-q) log(1-q))`:

        ADW  = (1 - exp(-(KL + beta * H))) ** gamma
        loss = T**2 * sum_included(ADW * KL) / normalizer                       (variant="paper")
        loss = T**2 * sum_included(ADW * CE_alpha) / normalizer                 (variant="released")
        CE_alpha = -(alpha * q * log p + (1 - alpha) * (1 - q) * log(1 - p))

    The teacher logits are a fixed target (no gradient reaches them). The gradient flows through ADW, as in the paper
    and the released code, unless `detach_weight=True`.

    `variant="released"` follows the authors' Caffe2 operator: the weight multiplies a soft-target cross-entropy
    (with `alpha=0.5` that is `0.5 * (KL + H)`, so it never reaches zero). Its config option `LOSS_BETA` has the
    opposite sense of the paper's beta (its exponent is `KL + (1 - LOSS_BETA) * H`); here `beta` is always the paper's,
    so `LOSS_BETA = 0` there is `beta = 1` here. The released code also only multiplies the loss by `T**2` without
    dividing the logits by `T`; here both variants divide by `T` (identical at the released `T = 1`).

    Args:
        student_logits (`torch.Tensor` of shape `(..., C)`):
            Raw classification logits of the student, e.g. `(B, N, C)` over images, anchors (all levels) and classes.
            Any float dtype; the loss is computed in fp32 (fp64 for fp64 inputs).
        teacher_logits (`torch.Tensor` of the same shape):
            Raw logits of the teacher for the same entries.
        beta (`float`, defaults to 1.0):
            Weight of the teacher entropy (hard-to-learn entries) in the weight's exponent, paper's sense, `>= 0`.
        gamma (`float`, defaults to 2.0):
            Focusing exponent of the weight, `>= 0`; `0` makes the weight 1.
        temperature (`float`, defaults to 1.0):
            `T`: logits are divided by it and the loss multiplied by `T**2`.
        normalizer (`str`, `float` or `torch.Tensor`, defaults to `"adaptive"`):
            `"adaptive"`: `max(1, sum over included entries of q ** power)`, computed without gradient;
            `"none"`: no division (the plain sum); a positive number or a one-element tensor (detached): divide by it.
        power (`float`, defaults to 1.8):
            Exponent of `q` in the adaptive normaliser.
        mask (`torch.BoolTensor`, *optional*):
            True = included. Broadcastable to the leading dims (e.g. `(B, N)` to exclude RetinaNet "ignore" anchors)
            or to the full shape `(..., C)`. Excluded entries count neither in the sum nor in the normaliser, and get
            a zero gradient (their logits must still be finite: the mask multiplies, it does not select).
        variant (`str`, defaults to `"paper"`):
            `"paper"` (ADW * KL) or `"released"` (ADW * CE_alpha, see above).
        alpha (`float`, defaults to 0.5):
            Balance of the positive part of `CE_alpha` (`"released"` only).
        detach_weight (`bool`, defaults to `False`):
            Stop the gradient through ADW (the value is unchanged).
        sync_normalizer (`bool`, defaults to `False`):
            Under an initialised `torch.distributed`, average the normaliser over processes (for `"adaptive"`, the
            soft count is averaged, then clamped to >= 1). No-op otherwise.
        return_stats (`bool`, defaults to `False`):
            Also return a dict of detached 0-dim tensors: `"normalizer"` (the value divided by) and `"mean_weight"`
            (mean ADW over included entries).

    Returns:
        `torch.Tensor`: 0-dim fp32 loss (fp64 for fp64 inputs), also under autocast; with `return_stats`, the
        tuple `(loss, stats)`.
    """
    return _distillation_loss(
        student_logits, teacher_logits, beta=beta, gamma=gamma, temperature=temperature, normalizer=normalizer,
        power=power, mask=mask, variant=variant, alpha=alpha, detach_weight=detach_weight,
        sync_normalizer=sync_normalizer, return_stats=return_stats,
    )


def kl_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    normalizer: str | float | Tensor = "adaptive",
    power: float = 1.8,
    mask: Tensor | None = None,
    sync_normalizer: bool = False,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Plain binary KL distillation: `T**2 * sum_included KL(q || p) / normalizer` (ADL with a weight of 1).

    Arguments and return value as in `adaptive_distillation_loss`; `stats["mean_weight"]` is 1.
    """
    return _distillation_loss(
        student_logits, teacher_logits, beta=0.0, gamma=0.0, temperature=temperature, normalizer=normalizer,
        power=power, mask=mask, variant="paper", alpha=0.5, detach_weight=False,
        sync_normalizer=sync_normalizer, return_stats=return_stats,
    )


def focal_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    gamma: float = 2.0,
    temperature: float = 1.0,
    normalizer: str | float | Tensor = "adaptive",
    power: float = 1.8,
    mask: Tensor | None = None,
    detach_weight: bool = False,
    sync_normalizer: bool = False,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Focal-style distillation, hard-to-mimic entries only: weight `(1 - exp(-KL)) ** gamma` on KL (ADL, beta = 0).

    Arguments and return value as in `adaptive_distillation_loss`.
    """
    return _distillation_loss(
        student_logits, teacher_logits, beta=0.0, gamma=gamma, temperature=temperature, normalizer=normalizer,
        power=power, mask=mask, variant="paper", alpha=0.5, detach_weight=detach_weight,
        sync_normalizer=sync_normalizer, return_stats=return_stats,
    )
