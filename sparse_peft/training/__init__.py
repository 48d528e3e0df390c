"""Training-time helpers: the SEFT topology callback, losses, and block-wise reconstruction after pruning
(SPT's gradual pruning lives with its tuner)."""
