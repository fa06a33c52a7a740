"""kfoundry: a Korean-first foundry for building foundation language models from scratch."""

__version__ = "0.1.0"
