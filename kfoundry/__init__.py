"""kfoundry: a Korean-first foundry for building foundation language models from scratch."""

import os as _os

# Bit-reproducible CPU training: by default MKL and OpenMP may use fewer threads than asked for when the machine is
# busy, which changes the order of floating-point sums between two runs of the same seed. Fixing the thread team
# makes a resumed run end with exactly the weights of an uninterrupted one. (Read when the libraries load, so this
# must run before torch is imported; users can still override it in their environment.)
_os.environ.setdefault("MKL_DYNAMIC", "FALSE")
_os.environ.setdefault("OMP_DYNAMIC", "FALSE")

__version__ = "0.1.0"
