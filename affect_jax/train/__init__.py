"""Training stages and the trainer they share."""
