"""Run α-SPIN in a subprocess and SIGKILL it at a chosen point (used by test_resume.py).

    python tests/crash_driver.py KILL_POINT OVERRIDE...

KILL_POINT: ``generate:N`` (right after the N-th generation shard is stored), ``train:N`` (right
after training checkpoint N is stored), or ``none``. The product code is unchanged: the driver
wraps two methods in this process only.
"""

import os
import signal
import sys

from alphaspin import pipeline, storage, training
from alphaspin.config import load_config


def kill_after(count: int, predicate):
    seen = [0]

    def check(*args):
        if predicate(*args):
            seen[0] += 1
            if seen[0] == count:
                os.kill(os.getpid(), signal.SIGKILL)

    return check


def main() -> None:
    point, overrides = sys.argv[1], sys.argv[2:]
    if point != "none":
        where, count = point.split(":")
        count = int(count)
        if where == "generate":
            original = storage.StageDir.write_table
            check = kill_after(count, lambda name: name.startswith("shards/"))

            def write_table(self, name, frame):
                original(self, name, frame)
                check(name)

            storage.StageDir.write_table = write_table
        elif where == "train":
            original_save = training.StorageCheckpointCallback.on_save
            check = kill_after(count, lambda: True)

            def on_save(self, args, state, control, **kwargs):
                result = original_save(self, args, state, control, **kwargs)
                check()
                return result

            training.StorageCheckpointCallback.on_save = on_save
    pipeline.run(load_config("configs/quickstart.yaml", overrides))


if __name__ == "__main__":
    main()
