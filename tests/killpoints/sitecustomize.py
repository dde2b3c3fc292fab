"""Test-only kill switch: `kill -9` a `python -m pipeline.train` process at a chosen point of its run.

tests/test_train_kills.py puts this folder first on PYTHONPATH, so that Python imports this module at start-up, in
the stage's own process even when `dvc repro` starts it. PADDY_KILL_AT says where:
  tta        as the first TTA starts (after the last epoch's checkpoint)
  epoch:<n>  in the middle of the training epoch after the n-th completed one (state.json's completed_epochs == n)
Any other process (pytest, dvc itself) is left alone.
"""

import json
import os
import signal
import sys

KILL_AT = os.environ.get("PADDY_KILL_AT")

if KILL_AT and "pipeline.train" in sys.orig_argv:
    from fastai.learner import Learner

    def kill_this_process():
        os.kill(os.getpid(), signal.SIGKILL)

    if KILL_AT == "tta":
        Learner.tta = lambda self, *args, **kwargs: kill_this_process()
    else:
        completed_epochs = int(KILL_AT.removeprefix("epoch:"))
        do_one_batch = Learner._do_one_batch

        def do_one_batch_or_die(self):
            # train.py points learn.path at the member's checkpoint folder, where state.json counts the epochs.
            if self.training and self.iter == 1:
                if json.loads((self.path / "state.json").read_text())["completed_epochs"] == completed_epochs:
                    kill_this_process()
            return do_one_batch(self)

        Learner._do_one_batch = do_one_batch_or_die
