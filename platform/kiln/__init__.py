"""kiln: train, track, export and serve PyTorch models on Ray."""

__version__ = "0.1.0"
