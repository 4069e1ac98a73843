"""Faults during training: non-finite steps, interrupted checkpoints, a killed run, a crashed process.

- A NaN/inf loss (or NaN gradients) skips the optimizer step: weights, AdamW moments and BatchNorm statistics after
  the step equal those before it; the skip is counted (`nonfinite_steps`) and logged; `max_consecutive_nonfinite_steps`
  in a row stop the run with an error naming the cause. With gradient accumulation the whole step is skipped.
- transformers 5.24's `Trainer._save_checkpoint` writes `checkpoint-N` in place, file by file (no temporary folder,
  no rename); `CompleteCheckpointCallback` keeps a `checkpoint-N.incomplete` marker beside it until every process
  has written its part, and resumption ignores marked or half-written folders (or refuses them by name).
- A run SIGKILLed after its first checkpoint and resumed with `--resume_from_checkpoint last` ends with bitwise the
  weights of an uninterrupted run (subprocesses running the real `hf_sad.cli` distill entry point).
- A 2-process torchrun where one rank dies exits non-zero within a bounded time instead of hanging.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from hf_sad.synthetic import make_labeled_dataset
from hf_sad.trainer import SADTrainer, checkpoint_problems, get_last_complete_checkpoint

from .robust_utils import StopAt, finish, make_args, start, tiny_detector

WORKER = Path(__file__).with_name("robust_worker.py")
TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    return make_labeled_dataset(8, seed=0, image_size=64, cache_dir=str(tmp_path_factory.mktemp("cache")))


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
    with caplog.at_level(logging.WARNING, logger="hf_sad.callbacks"):
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
    with caplog.at_level(logging.WARNING, logger="hf_sad.callbacks"):
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
# Real processes: SIGKILL and resume; a crashed DDP rank
# ----------------------------------------------------------------------------------------------------------------------


def worker_env(tmp_path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"), "PYTHONUNBUFFERED": "1"}


def distill_args(teacher: Path, output_dir: Path) -> list[str]:
    return ["--teacher", str(teacher), "--student", "resnet18", "--image_size", "64", "--fpn_channels", "8",
            "--head_channels", "8", "--head_num_convs", "1", "--train_data", "synthetic:8", "--synthetic_image_size",
            "64", "--unlabeled_data", "synthetic", "--output_dir", str(output_dir), "--max_steps", "6",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--save_strategy", "steps",
            "--save_steps", "2", "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--seed",
            "0", "--dataloader_num_workers", "0", "--use_cpu"]


@pytest.fixture(scope="module")
def saved_teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    teacher, processor = tiny_detector(seed=1)
    teacher.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_run_killed_with_sigkill_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, saved_teacher):
    env = worker_env(tmp_path)
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = start([sys.executable, str(WORKER), "pause", "0", *distill_args(saved_teacher, full_dir)], env)
    cut = start([sys.executable, str(WORKER), "pause", "2", *distill_args(saved_teacher, cut_dir)], env)
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

    resumed = start([sys.executable, str(WORKER), "pause", "0", *distill_args(saved_teacher, cut_dir),
                     "--resume_from_checkpoint", "last"], env)
    output = finish(resumed, timeout=300)
    assert resumed.returncode == 0, output[-4000:]
    expected, got = load_file(str(full_dir / "model.safetensors")), load_file(str(cut_dir / "model.safetensors"))
    assert set(expected) == set(got)
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    results = json.loads((full_dir / "results.json").read_text())  # the robustness counters reach the results
    assert results["skipped_images"] == results["dropped_boxes"] == results["nonfinite_steps"] == 0


def test_a_dying_process_fails_a_two_process_run_within_bounded_time(tmp_path, saved_teacher):
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(WORKER), "die", "2",
               *distill_args(saved_teacher, tmp_path / "out"), "--ddp_timeout", "60"]
    started = time.monotonic()
    process = start(command, worker_env(tmp_path))
    output = finish(process, timeout=150)
    elapsed = time.monotonic() - started
    assert process.returncode != 0, output[-4000:]
    assert "rank 1: exiting abruptly at step 2" in output
    assert elapsed < 120, f"took {elapsed:.0f} s"
    print(f"torchrun exited with {process.returncode} after {elapsed:.1f} s")
