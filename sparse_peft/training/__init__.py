"""Training-time helpers: the SEFT topology callback and losses (SPT's gradual pruning lives with its tuner)."""
