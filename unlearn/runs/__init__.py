"""Ready-made runs: the seed's training loop, its datasets and models, the poison, checkpoints and run folders.

What ``python -m unlearn train`` builds on; a user's own loop needs none of it
(``unlearn.recording.attach``).
"""

from .loop import default_device, make_loader, make_optimizer, train

__all__ = ["default_device", "make_loader", "make_optimizer", "train"]
