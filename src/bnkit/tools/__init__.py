"""What a user runs on a model or a checkpoint."""
