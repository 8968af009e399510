"""prunequant."""
