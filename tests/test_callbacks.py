"""Callbacks that keep a training run safe (`hf_sad.training.callbacks`): bad data, bad steps, interrupted checkpoints.

- Undecodable images met during training are skipped and counted (`skipped_images` in the logs and the results), also
  when DataLoader workers collate; too many stop the run with examples, but only after `min_images_before_skip_check`
  images; a labeled one stops the run naming it unless `skip_bad_labeled_images`; when every image is undecodable the
  model never changes. Dropped boxes are counted in the training logs (`dropped_boxes`).
- A NaN/inf loss (or NaN gradients) skips the optimizer step: weights, AdamW moments and BatchNorm statistics after
  the step equal those before it; the skip is counted (`nonfinite_steps`) and logged; `max_consecutive_nonfinite_steps`
  in a row stop the run with an error naming the cause. With gradient accumulation the whole step is skipped.
- transformers 5.24's `Trainer._save_checkpoint` writes `checkpoint-N` in place, file by file (no temporary folder,
  no rename); `CompleteCheckpointCallback` keeps a `checkpoint-N.incomplete` marker beside it until every process
  has written its part, and resumption ignores marked or half-written folders (or refuses them by name).
- A run SIGKILLed after its first checkpoint and resumed with `--resume_from_checkpoint last` ends with bitwise the
  weights of an uninterrupted run (subprocesses running the real `hf_sad.cli` distill entry point).

A crashed process in a 2-process run is tested in test_distributed.py.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import signal
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from hf_sad.data.synthetic import make_unlabeled_stream
from hf_sad.training.callbacks import (
    SkipBadStepsCallback,
    TrainingGuard,
    checkpoint_problems,
    get_last_complete_checkpoint,
)
from hf_sad.training.trainer import SADTrainer

from .utils import (
    FAULT_WORKER,
    GOOD_BOX,
    IMAGE_SIZE,
    StopAt,
    detection_dataset,
    distill_args,
    finish,
    image_value,
    jpeg,
    make_args,
    scene,
    start,
    student_and_teacher,
    tiny_detector,
    unlabeled_pool,
    worker_env,
)

# ----------------------------------------------------------------------------------------------------------------------
# Undecodable images and dropped boxes during training
# ----------------------------------------------------------------------------------------------------------------------


def test_training_where_every_image_is_undecodable_never_updates_the_model(tmp_path, bad_values):
    """Labeled images all bad, skipping chosen: every batch is a placeholder; no weight, buffer or optimizer change."""
    bad = [bad_values[name] for name in ("corrupt_bytes", "truncated_jpeg", "not_an_image", "random_noise")]
    data = detection_dataset(bad, [{"bbox": [[1, 1, 4, 4]], "category": [0]}] * len(bad))
    model, processor = tiny_detector()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = make_args(tmp_path, skip_bad_labeled_images=True, max_steps=2, per_device_train_batch_size=2)
    trainer = SADTrainer(model, None, args, data, processing_class=processor)
    result = trainer.train()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not state for state in trainer.optimizer.state.values())  # AdamW never stepped
    assert result.metrics["skipped_images"] == 4 and result.metrics["nonfinite_steps"] == 0


@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming"])
def test_training_skips_and_counts_undecodable_unlabeled_images(tmp_path, labeled, bad_values, streaming, caplog):
    """Unlabeled pool = good + the 7 bad inputs; 8-row batches alternate L, U: step 1 reads the good image and 3 bad
    ones, step 2 the other 4 bad ones (a batch of labeled rows only)."""
    names = sorted(bad_values)
    good = image_value(jpeg(scene(64, 64)), "good")
    pool = unlabeled_pool([good] + [bad_values[name] for name in names], streaming=streaming)
    model, processor = tiny_detector()
    teacher, _ = tiny_detector(seed=1)
    args = make_args(tmp_path, distill_loss="adl", max_steps=2, per_device_train_batch_size=8)
    trainer = SADTrainer(model, teacher, args, labeled, pool, processing_class=processor)
    with caplog.at_level(logging.WARNING, logger="hf_sad.data.collator"):
        result = trainer.train()
    logged = [entry["skipped_images"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [3, 7]  # cumulative
    assert result.metrics["skipped_images"] == 7
    warned = " ".join(r.getMessage() for r in caplog.records)
    for name in names:
        assert bad_values[name]["path"] in warned, name
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


def test_dataloader_workers_report_skips_through_the_batch(tmp_path, labeled, bad_values):
    """With a worker process the collator's own counter is invisible to the trainer; the batch carries the count."""
    good = image_value(jpeg(scene(64, 64)), "good")
    pool = unlabeled_pool([good, bad_values["truncated_jpeg"]] * 4, streaming=True)
    model, processor = tiny_detector()
    args = make_args(tmp_path, distill_loss="adl", max_steps=2, dataloader_num_workers=1)
    trainer = SADTrainer(model, tiny_detector(seed=1)[0], args, labeled, pool, processing_class=processor)
    result = trainer.train()
    assert result.metrics["skipped_images"] == 2
    assert trainer.data_collator.stats.images_seen == 0  # the collator ran in the worker, not here


def test_too_many_skipped_images_stop_the_run_with_examples(tmp_path, labeled, bad_values):
    good = image_value(jpeg(scene(64, 64)), "good")
    pool = unlabeled_pool([good, bad_values["corrupt_bytes"]] * 4, streaming=True)
    model, processor = tiny_detector()
    args = make_args(tmp_path, distill_loss="adl", max_steps=3, min_images_before_skip_check=4,
                     max_skipped_image_fraction=0.2)
    trainer = SADTrainer(model, tiny_detector(seed=1)[0], args, labeled, pool, processing_class=processor)
    with pytest.raises(RuntimeError) as error:
        trainer.train()
    message = str(error.value)
    assert "1 of the 4 training images" in message and "max_skipped_image_fraction=0.2" in message
    assert "'corrupt_bytes.img' sample_index=3" in message


def test_labeled_undecodable_image_is_refused_before_training_naming_it_or_skipped_when_chosen(tmp_path, bad_values):
    good = image_value(jpeg(scene(64, 64)), "good")
    images = [good, good, bad_values["zero_byte_file"], good]
    data = detection_dataset(images, [{"bbox": [[4, 4, 16, 16]], "category": [0]}] * 4)
    model, processor = tiny_detector()
    args = make_args(tmp_path, max_steps=1, per_device_train_batch_size=4)
    with pytest.raises(ValueError, match=r"train_dataset: 1 of 4 images cannot be read as images, e.g. .*empty\.jpg"):
        SADTrainer(model, None, args, data, processing_class=processor)
    args = make_args(tmp_path, max_steps=1, per_device_train_batch_size=4, skip_bad_labeled_images=True)
    result = SADTrainer(model, None, args, data, processing_class=processor).train()
    assert result.metrics["skipped_images"] == 1


def test_dropped_boxes_are_counted_in_the_training_logs(tmp_path, picture):
    objects = [{"bbox": [GOOD_BOX, [5, 5, -3, 4]], "category": [0, 1]}, {"bbox": [[90, 90, 5, 5]], "category": [2]}]
    data = detection_dataset([picture, image_value(jpeg(scene(64, 64)), "other")], objects)
    model, processor = tiny_detector()
    trainer = SADTrainer(model, None, make_args(tmp_path, max_steps=2, per_device_train_batch_size=2), data,
                         processing_class=processor)
    result = trainer.train()
    assert [e["dropped_boxes"] for e in trainer.state.log_history if "loss" in e] == [2, 4]
    assert result.metrics["dropped_boxes"] == 4


# ----------------------------------------------------------------------------------------------------------------------
# Non-finite steps
# ----------------------------------------------------------------------------------------------------------------------


class Snapshots(TrainerCallback):
    """After every optimizer step: the model's state dict and the optimizer's per-parameter state."""

    def __init__(self):
        self.after: dict[int, tuple[dict, list]] = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        moments = [{k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
                   for group in optimizer.param_groups for p in group["params"]]
        self.after[state.global_step] = (weights, moments)


def same_state(a, b) -> bool:
    (weights_a, moments_a), (weights_b, moments_b) = a, b
    return all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a) and all(
        set(x) == set(y) and all(torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])) for k in x)
        for x, y in zip(moments_a, moments_b))


def nan_trainer(tmp_path, labeled, nan_calls, **kwargs):
    """A trainer whose student returns NaN logits (hence a NaN loss) on the chosen training forward passes (counted
    from 0, one per micro-batch)."""
    model, processor = tiny_detector()
    snapshots = Snapshots()
    args = make_args(tmp_path, per_device_train_batch_size=2, **kwargs)
    trainer = SADTrainer(model, None, args, labeled, processing_class=processor, callbacks=[snapshots])
    calls = iter(range(10**6))

    def poison(module, inputs, output):
        return output * float("nan") if module.training and next(calls) in nan_calls else output

    model.class_head.register_forward_hook(poison)
    return trainer, snapshots


@pytest.mark.parametrize("accumulation", [1, 2])
def test_nonfinite_loss_skips_the_step_counts_and_logs_it(tmp_path, labeled, caplog, accumulation):
    # With accumulation 2, forward pass 2 is the first micro-batch of step 2: the whole step is skipped.
    trainer, snapshots = nan_trainer(tmp_path, labeled, {accumulation}, max_steps=3,
                                     gradient_accumulation_steps=accumulation, weight_decay=0.1)
    with caplog.at_level(logging.WARNING, logger="hf_sad.training.callbacks"):
        result = trainer.train()
    after = snapshots.after
    assert same_state(after[2], after[1]), "the NaN step changed weights, BatchNorm statistics or AdamW state"
    assert not same_state(after[3], after[2]), "training went on after the skipped step"
    assert [e["nonfinite_steps"] for e in trainer.state.log_history if "loss" in e] == [0, 1, 1]
    assert result.metrics["nonfinite_steps"] == 1
    assert any("Step 2 skipped (no weight update): the loss was NaN or infinite" in r.getMessage()
               for r in caplog.records)
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values() if v.is_floating_point())


def test_nan_pixels_never_reach_the_batchnorm_statistics(tmp_path, labeled):
    model, processor = tiny_detector()
    args = make_args(tmp_path, max_steps=3, per_device_train_batch_size=2)
    trainer = SADTrainer(model, None, args, labeled, processing_class=processor)
    collate = trainer.data_collator

    def poisoned(rows):  # the third batch (stream rows 4, 5) carries a NaN image
        batch = collate(rows)
        if any(row["sample_index"] == 5 for row in rows):
            batch["pixel_values"][0] = float("nan")
        return batch

    trainer.data_collator = poisoned
    result = trainer.train()
    assert result.metrics["nonfinite_steps"] == 1
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f"poisoned: {bad[:5]}"


def test_nonfinite_gradients_with_a_finite_loss_skip_the_step(tmp_path, labeled, caplog):
    model, processor = tiny_detector()
    snapshots = Snapshots()
    trainer = SADTrainer(model, None, make_args(tmp_path, max_steps=3, per_device_train_batch_size=2), labeled,
                         processing_class=processor, callbacks=[snapshots])
    weight = model.class_head.predictor.weight
    weight.register_hook(lambda grad: grad * float("inf") if trainer.state.global_step == 1 else grad)
    with caplog.at_level(logging.WARNING, logger="hf_sad.training.callbacks"):
        result = trainer.train()
    assert same_state(snapshots.after[2], snapshots.after[1])
    assert result.metrics["nonfinite_steps"] == 1
    assert any("the gradients were NaN or infinite" in r.getMessage() for r in caplog.records)
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


def test_consecutive_nonfinite_steps_stop_the_run_naming_the_cause(tmp_path, labeled):
    trainer, snapshots = nan_trainer(tmp_path, labeled, range(1, 100), max_steps=8,
                                     max_consecutive_nonfinite_steps=3)
    with pytest.raises(RuntimeError) as error:
        trainer.train()
    message = str(error.value)
    assert "the loss was NaN or infinite for 3 consecutive optimizer steps" in message
    assert "max_consecutive_nonfinite_steps=3" in message and "weights are not poisoned" in message
    assert same_state(snapshots.after[3], snapshots.after[1])  # steps 2 and 3 skipped; step 4 raised
    assert trainer.state.global_step == 3


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints that were not completely written
# ----------------------------------------------------------------------------------------------------------------------


class SimulatedKill(Exception):
    pass


class CrashWhileSaving(SADTrainer):
    """Dies (an exception) while writing the checkpoint of step `crash_at`: weights written, optimizer and state not."""

    crash_at = 4

    def _save_optimizer_and_scheduler(self, output_dir):
        if self.state.global_step == self.crash_at:
            raise SimulatedKill("while writing a checkpoint")
        return super()._save_optimizer_and_scheduler(output_dir)


def run(labeled, output_dir, trainer_class=SADTrainer, resume=None, stop_at=None):
    model, processor = tiny_detector()
    args = make_args(output_dir.parent, output_dir=str(output_dir), max_steps=4, save_strategy="steps", save_steps=2,
                     per_device_train_batch_size=2)
    trainer = trainer_class(model, None, args, labeled, processing_class=processor,
                            callbacks=[StopAt(stop_at)] if stop_at else None)
    trainer.train(resume_from_checkpoint=resume)
    return model.state_dict()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, labeled):
    return run(labeled, tmp_path_factory.mktemp("full") / "out")


def assert_same_weights(a, b):
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_interrupted_while_written_is_never_resumed_from(tmp_path, labeled, uninterrupted):
    out = tmp_path / "out"
    with pytest.raises(SimulatedKill):
        run(labeled, out, CrashWhileSaving)
    partial = out / "checkpoint-4"
    assert (partial / "model.safetensors").exists() and (out / "checkpoint-4.incomplete").exists()
    assert not (out / "checkpoint-2.incomplete").exists()
    assert get_last_checkpoint(str(out)) == str(partial)  # what transformers alone would resume from
    problems = checkpoint_problems(partial)
    assert any("writing was interrupted" in p for p in problems) and "trainer_state.json is missing" in problems
    assert get_last_complete_checkpoint(out) == str(out / "checkpoint-2")

    with pytest.raises(ValueError, match=rf"Cannot resume from {partial}: .*resume from {out / 'checkpoint-2'}"):
        run(labeled, out, resume=str(partial))
    resumed = run(labeled, out, resume=True)  # picks checkpoint-2, the last complete one
    assert_same_weights(resumed, uninterrupted)
    assert not (out / "checkpoint-4.incomplete").exists() and not checkpoint_problems(out / "checkpoint-4")


def test_half_written_checkpoint_folder_is_ignored_or_refused_by_name(tmp_path, labeled, uninterrupted):
    out = tmp_path / "out"
    run(labeled, out, stop_at=2)
    half = out / "checkpoint-4"  # e.g. left by a run killed mid-save before it had markers: no weights, no state
    half.mkdir()
    (half / "config.json").write_text("{}")
    with pytest.raises(ValueError) as error:
        run(labeled, out, resume=str(half))
    message = str(error.value)
    assert "trainer_state.json is missing" in message and "no model weights" in message
    assert f"resume from {out / 'checkpoint-2'}" in message

    resumed = run(labeled, out, resume="last")  # the CLI spelling of resume_from_checkpoint=True
    assert_same_weights(resumed, uninterrupted)

    empty = tmp_path / "empty"
    (empty / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(ValueError, match="no complete checkpoint in"):
        run(labeled, empty, resume=True)


# ----------------------------------------------------------------------------------------------------------------------
# A real process: SIGKILL and resume
# ----------------------------------------------------------------------------------------------------------------------


def test_run_killed_with_sigkill_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, saved_teacher):
    env = worker_env(tmp_path)
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = start([sys.executable, str(FAULT_WORKER), "pause", "0", *distill_args(saved_teacher, full_dir)], env)
    cut = start([sys.executable, str(FAULT_WORKER), "pause", "2", *distill_args(saved_teacher, cut_dir)], env)
    deadline = time.monotonic() + 240
    while not (cut_dir / "paused").exists():  # the checkpoint of step 2 is complete; steps 3.. not run yet
        if cut.poll() is not None or time.monotonic() > deadline:
            os.killpg(cut.pid, signal.SIGKILL)
            pytest.fail(f"the run to kill ended or stalled first:\n{cut.communicate()[0][-4000:]}")
        time.sleep(0.2)
    os.kill(cut.pid, signal.SIGKILL)
    cut.communicate(timeout=60)
    assert cut.returncode == -signal.SIGKILL
    assert not checkpoint_problems(cut_dir / "checkpoint-2") and not (cut_dir / "model.safetensors").exists()
    output = finish(full, timeout=300)
    assert full.returncode == 0, output[-4000:]

    resumed = start([sys.executable, str(FAULT_WORKER), "pause", "0", *distill_args(saved_teacher, cut_dir),
                     "--resume_from_checkpoint", "last"], env)
    output = finish(resumed, timeout=300)
    assert resumed.returncode == 0, output[-4000:]
    expected, got = load_file(str(full_dir / "model.safetensors")), load_file(str(cut_dir / "model.safetensors"))
    assert set(expected) == set(got)
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    results = json.loads((full_dir / "results.json").read_text())  # the robustness counters reach the results
    assert results["skipped_images"] == results["dropped_boxes"] == results["nonfinite_steps"] == 0


# ----------------------------------------------------------------------------------------------------------------------
# Skipping through transformers' hook, also under a GradScaler (fp16)
# ----------------------------------------------------------------------------------------------------------------------


def test_steps_are_skipped_through_the_trainer_hook_without_rebinding_the_optimizer(tmp_path, labeled):
    model, processor = tiny_detector()
    trainer = SADTrainer(model, None, make_args(tmp_path, max_steps=1, per_device_train_batch_size=2), labeled,
                         processing_class=processor)
    trainer.train()
    # accelerate wraps the torch optimizer's step itself; nothing of hf_sad may sit in that chain.
    for optimizer in (trainer.optimizer, trainer.optimizer.optimizer):
        step = vars(optimizer).get("step")
        module = getattr(getattr(step, "__func__", step), "__module__", "") or ""
        assert not module.startswith("hf_sad"), f"{type(optimizer).__name__}.step was rebound by {module}"
    assert any(isinstance(cb, TrainingGuard) and isinstance(cb.steps, SkipBadStepsCallback)
               for cb in trainer.callback_handler.callbacks)


@pytest.mark.parametrize("clipped", [True, False], ids=["after-clipping", "without-clipping"])
@pytest.mark.parametrize("bad", ["nan-loss", "empty-batch"])
def test_skipped_step_under_a_grad_scaler_changes_nothing(clipped, bad):
    """What transformers does around the hook under fp16 (scaled backward, optional clipping that unscales, the hook,
    then accelerate's optimizer step through the GradScaler), with torch's CPU GradScaler: the skipped step must not
    raise inside GradScaler.step and must leave weights and AdamW state as they were."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)  # the process state AcceleratedOptimizer reads
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)).train()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    optimizer = AcceleratedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1), device_placement=False,
                                     scaler=scaler)
    guard = SkipBadStepsCallback()
    x = torch.randn(8, 4)

    def step(global_step: int, loss_factor: float, rows: int) -> None:
        guard.start_batch(model, global_step)
        loss = model(x).square().mean() * loss_factor
        guard.end_batch(model, loss, rows, {"loss": loss.detach()})
        scaler.scale(loss).backward()
        if clipped:
            scaler.unscale_(optimizer.optimizer)
        guard.on_pre_optimizer_step(None, SimpleNamespace(global_step=global_step), None, model=model,
                                    optimizer=optimizer)
        optimizer.step()
        optimizer.zero_grad()

    step(0, 1.0, 8)  # a normal step creates the optimizer state
    before = ({k: v.clone() for k, v in model.state_dict().items()},
              [{k: v.clone() for k, v in optimizer.optimizer.state[p].items()} for p in model.parameters()])
    if bad == "nan-loss":
        step(1, float("nan"), 8)
        assert guard.nonfinite_steps == 1
    else:
        step(1, 1.0, 0)
    after_state = [optimizer.optimizer.state[p] for p in model.parameters()]
    assert all(torch.equal(before[0][k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(b[k], a[k]) for b, a in zip(before[1], after_state) for k in b)
    step(2, 1.0, 8)  # and training goes on
    assert not torch.equal(before[0]["0.weight"], model.state_dict()["0.weight"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 mixed precision (accelerate's GradScaler) needs CUDA")
def test_nonfinite_step_is_skipped_in_fp16_training_on_cuda(tmp_path, labeled):
    trainer, snapshots = nan_trainer(tmp_path, labeled, {1}, max_steps=3, fp16=True, use_cpu=False)
    result = trainer.train()
    assert same_state(snapshots.after[2], snapshots.after[1])
    assert result.metrics["nonfinite_steps"] == 1


# ----------------------------------------------------------------------------------------------------------------------
# BatchNorm statistics from labeled images only
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unlabeled_updates", [False, True])
def test_unlabeled_images_can_be_kept_out_of_the_batchnorm_statistics(tmp_path, labeled, unlabeled_updates):
    """With unlabeled_updates_batchnorm=False the running statistics after a step are a momentum update with the
    labeled images' statistics, whatever the unlabeled images hold."""
    student, teacher, processor = student_and_teacher()
    args = make_args(tmp_path, distill_loss="adl", unlabeled_updates_batchnorm=unlabeled_updates)
    trainer = SADTrainer(student, teacher, args, labeled, make_unlabeled_stream(image_size=IMAGE_SIZE),
                         processing_class=processor)
    batch = trainer._prepare_inputs(trainer.data_collator(list(trainer.train_dataset.take(4))))
    assert batch["is_labeled"].tolist() == [True, False, True, False]
    noisy = {**batch, "pixel_values": batch["pixel_values"].clone()}
    noisy["pixel_values"][~batch["is_labeled"]] = torch.randn_like(noisy["pixel_values"][~batch["is_labeled"]]) * 3

    def statistics_after(inputs):
        model = copy.deepcopy(student).train()
        trainer.compute_loss(model, inputs).backward()
        for callback in trainer.callback_handler.callbacks:
            callback.on_pre_optimizer_step(args, trainer.state, trainer.control, model=model,
                                           optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
        return {k: v for k, v in model.state_dict().items() if "running" in k}

    # The first layer's input is a function of each image's own pixels (deeper layers see all rows, through the
    # batch statistics every layer still normalises with): its statistics must ignore the unlabeled images.
    clean, with_noise = statistics_after(batch), statistics_after(noisy)
    first = ("backbone.body.bn1.running_mean", "backbone.body.bn1.running_var")
    assert all(torch.equal(clean[k], with_noise[k]) for k in first) is not unlabeled_updates

    if not unlabeled_updates:  # the first BatchNorm layer's update, by hand, from the labeled rows' input
        bn1, inputs = student.backbone.body.bn1, []
        handle = student.backbone.body.conv1.register_forward_hook(lambda m, i, o: inputs.append(o.detach()))
        student.train()(pixel_values=batch["pixel_values"][batch["is_labeled"]])
        handle.remove()
        rows = inputs[0]
        mean, var = rows.mean((0, 2, 3)), rows.var((0, 2, 3))
        before_mean, before_var = torch.zeros_like(mean), torch.ones_like(var)  # a fresh layer's statistics
        torch.testing.assert_close(clean["backbone.body.bn1.running_mean"], 0.9 * before_mean + 0.1 * mean)
        torch.testing.assert_close(clean["backbone.body.bn1.running_var"], 0.9 * before_var + 0.1 * var)
        assert bn1.momentum == 0.1
