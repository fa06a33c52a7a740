"""kfoundry: a Korean-first foundry for building foundation language models from scratch."""

import os as _os

# Bit-reproducible CPU training. By default MKL and OpenMP may use fewer threads than asked for when the machine is
# busy, and MKL may pick different code paths for differently aligned buffers; both change the order of
# floating-point sums between two processes running the same seed. A fixed thread team and MKL's strict conditional
# numerical reproducibility mode make a resumed run end with exactly the weights of an uninterrupted one (no
# measurable cost here). Read when the libraries load, so this must run before torch is imported; users can still
# override it in their environment.
# With a fixed team, threads that wait must sleep rather than spin: on a machine busy with other work, spinning
# threads steal the cores the others need (measured: 7x slower training on a loaded 2-core machine without this).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("MKL_DYNAMIC", "FALSE")
_os.environ.setdefault("OMP_DYNAMIC", "FALSE")
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
