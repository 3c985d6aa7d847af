"""Failures injected into the training ranks of tests/test_distributed_training.py (the product code is
unchanged, as with tests/crash_driver.py). Python imports ``sitecustomize`` at start-up from PYTHONPATH;
the test puts this folder there and says what to break in ``ALPHASPIN_TEST_INJECT``:

- ``raise:<rank>``: that rank raises RuntimeError("injected failure on rank <rank>") as it starts training;
- ``kill-after-checkpoint:<n>``: rank 0 SIGKILLs itself right after checkpoint n is stored (a lost node).
"""

import os

INJECT = os.environ.get("ALPHASPIN_TEST_INJECT", "")
RANK = os.environ.get("RANK")  # set by torchrun in the ranks only (not in the launcher or the test)

if INJECT and RANK is not None:
    what, _, arg = INJECT.partition(":")
    if what == "raise" and RANK == arg:
        import alphaspin.training

        def fit(*args, **kwargs):
            raise RuntimeError(f"injected failure on rank {RANK}")

        alphaspin.training.fit = fit
    elif what == "kill-after-checkpoint" and RANK == "0":
        import signal

        import alphaspin.training

        original = alphaspin.training.StorageCheckpointCallback.on_save

        def on_save(self, args, state, control, **kwargs):
            result = original(self, args, state, control, **kwargs)
            if state.global_step == int(arg):
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        alphaspin.training.StorageCheckpointCallback.on_save = on_save
