"""A pause for tests/test_preemption.py (the product code is unchanged, as with tests/crash_driver.py):
Python imports ``sitecustomize`` at start-up from PYTHONPATH, and the test puts this folder there with

- ``ALPHASPIN_TEST_PAUSE=<where>:<step>:<marker file>``: in the process ``where`` names (``main``: the
  process that trains with one process, i.e. no torchrun ``RANK``; ``rank0``: rank 0 of a launch), at the end
  of optimizer step ``<step>`` the trainer writes the marker file and waits (up to 120 s) for the SIGTERM that
  the test then sends from outside, so the signal lands at a known step; then training goes on as it would.
- ``ALPHASPIN_TEST_PAUSE=generate:<n>:<marker file>``: right after the n-th generation shard is stored, the
  pipeline's process writes the marker file and sleeps up to 120 s (the SIGTERM interrupts it).
"""

import os

PAUSE = os.environ.get("ALPHASPIN_TEST_PAUSE", "")
RANK = os.environ.get("RANK")  # set by torchrun in the ranks only

if PAUSE:
    where, step, marker = PAUSE.split(":", 2)
    if where == "generate" and RANK is None:
        import time
        from pathlib import Path

        from alphaspin import storage

        original_write = storage.StageDir.write_table
        stored = [0]

        def write_table(self, name, frame):
            original_write(self, name, frame)
            if name.startswith("shards/"):
                stored[0] += 1
                if stored[0] == int(step):
                    Path(marker).write_text(str(os.getpid()))
                    time.sleep(120)

        storage.StageDir.write_table = write_table
    elif (where == "main" and RANK is None) or (where == "rank0" and RANK == "0"):
        import time
        from pathlib import Path

        import alphaspin.training
        from alphaspin import preemption

        original = alphaspin.training.StorageCheckpointCallback.on_step_end

        def on_step_end(self, args, state, control, **kwargs):
            result = original(self, args, state, control, **kwargs)
            if state.global_step == int(step):
                Path(marker).write_text(str(os.getpid()))
                deadline = time.monotonic() + 120
                while not preemption.requested() and time.monotonic() < deadline:
                    time.sleep(0.05)
            return result

        alphaspin.training.StorageCheckpointCallback.on_step_end = on_step_end
