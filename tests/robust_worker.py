"""Worker of tests/test_callbacks.py and tests/test_distributed.py, run as a subprocess (or by torchrun, one copy per
rank); not a test module.

    python tests/robust_worker.py pause STEP [hf-sad distill arguments...]
    torchrun --standalone --nproc_per_node 2 tests/robust_worker.py die STEP [hf-sad distill arguments...]

Both run the real `hf_sad.cli.distill_main` (what `scripts/distill.py` runs) with `SADTrainer` swapped for a subclass
that adds one callback:

- `pause STEP`: once the checkpoint of global step STEP is saved (complete), write OUTPUT_DIR/paused and sleep, so
  that the test can SIGKILL the process mid-training at a known point. STEP 0 never pauses (a plain run).
- `die STEP`: rank 1 calls `os._exit(1)` when step STEP begins (a crashed process), leaving rank 0 alone in DDP.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import hf_sad.cli  # noqa: E402
from hf_sad.training.trainer import SADTrainer  # noqa: E402


class PauseAfterSave(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            (Path(args.output_dir) / "paused").write_text(str(state.global_step))
            time.sleep(600)  # the test kills the process here


class DieAtStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if state.global_step == self.step and rank == 1:
            print(f"rank 1: exiting abruptly at step {self.step}", flush=True)
            os._exit(1)


def main() -> None:
    mode, step, *argv = sys.argv[1:]
    callback = {"pause": PauseAfterSave, "die": DieAtStep}[mode](int(step))

    class WorkerTrainer(SADTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if callback.step:
                self.add_callback(callback)

    hf_sad.cli.SADTrainer = WorkerTrainer
    hf_sad.cli.distill_main(argv)


if __name__ == "__main__":
    main()
