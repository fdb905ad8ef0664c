"""What every task shares: the command line, optimisation, run state, checkpoint I/O, distributed training,
distillation, pictures, prediction writers, export, sliding windows and few-shot evaluation. Imports backbones,
heads, datamodules and ops; never a task module."""

from .version import __version__

__all__ = ["__version__"]
