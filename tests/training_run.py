"""Subprocess entry point of tests/test_training.py: ``python tests/training_run.py '<overrides as JSON>' [PROFILE]``.

Trains the profile (default ``cpu-smoke``) with those overrides (also under ``torch.distributed.run``). With the environment
variable ``SENRI_TEST_PAUSE_AT_STEP=N`` the process stops after optimizer step N, writes ``{run_dir}/paused-N``
and sleeps, so that the test can SIGKILL it at a known point; the command itself is the same as the rerun's.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from senri.training.config import ConfigManager
from senri.training.recipes import train


class PauseAt(TrainerCallback):
    def __init__(self, step: int, run_dir: str):
        self.step, self.run_dir = step, Path(run_dir)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            (self.run_dir / f"paused-{self.step}").write_text(str(os.getpid()))
            time.sleep(600)
        return control


if __name__ == "__main__":
    overrides = json.loads(sys.argv[1])
    pause = os.environ.get("SENRI_TEST_PAUSE_AT_STEP")
    callbacks = [PauseAt(int(pause), overrides["run_dir"])] if pause else []
    profile = sys.argv[2] if len(sys.argv) > 2 else "cpu-smoke"
    train(ConfigManager(profile, overrides=overrides), callbacks=callbacks)
