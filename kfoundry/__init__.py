"""kfoundry: a Korean-first foundry for building foundation language models from scratch."""

import os as _os

# Bit-reproducible CPU training: MKL may pick different code paths for differently aligned buffers, which changes
# the order of floating-point sums between two processes running the same seed. Its strict conditional numerical
# reproducibility mode makes a resumed run end with exactly the weights of an uninterrupted one (no measurable cost
# here). Read when MKL loads, so this must run before torch is imported; users can still override it.
# (Fixing MKL's thread team as well, MKL_DYNAMIC=FALSE, made training several times slower on a busy machine, and
# making idle threads sleep instead, OMP_WAIT_POLICY=PASSIVE, slowed batch-1 decoding down: neither is set.)
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
