"""The learning loop: model registry, review snapshot, fine-tune, evaluation gate."""
