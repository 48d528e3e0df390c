"""SEFT: sparse fine-tuning with drop-and-grow topology (see docs/seft.md)."""
