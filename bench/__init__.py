"""Performance benchmarks of alphaspin: each is ``python -m bench.<name>`` (see bench/README.md).

On a CPU shared with other processes, OpenMP's default busy-waiting makes torch's small ops up to
100x slower (measured here: 2 threads, load average 4 on 2 cores); the benchmarks therefore let
idle OpenMP threads sleep unless OMP_WAIT_POLICY is already set. It must be set before torch loads.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
