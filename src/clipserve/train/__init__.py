"""Contrastive training and linear probes on top of the engine.

- `clipserve.train.trainer.train`: CLIP training (from scratch or fine-tuning), one process or many.
- `clipserve.train.data`: image-text records from data specs, augmentation, sharded batches.
- `clipserve.train.probe`: linear probes on frozen image features (`LinearProbe`).
- `clipserve.train.digits`: a small CLIP trained on scikit-learn's digits, for tests and demos.
"""
