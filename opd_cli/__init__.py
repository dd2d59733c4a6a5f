"""opd: on-policy distillation failure/fix experiment runner."""

__version__ = "0.1.0"
