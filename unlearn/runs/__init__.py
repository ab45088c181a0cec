"""Ready-made runs: the seed's training loop, its datasets and models, the poison, checkpoints and run folders.

What ``python -m unlearn train`` builds on; a user's own loop needs none of it
(``unlearn.recording.attach``). ``RunConfig`` (``runs.config``) is a run's settings, as train.json holds them.
"""

from .config import RunConfig
from .loop import default_device, make_loader, make_optimizer, train

__all__ = ["RunConfig", "default_device", "make_loader", "make_optimizer", "train"]
