"""Training-time helpers: trainer callbacks (SEFT topology, gradual pruning) and losses."""
