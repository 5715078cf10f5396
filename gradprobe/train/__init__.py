"""Training: the alignment callback and monitor (Trainer and plain loops, distributed), the data pipeline
through the adapters, held-out evaluation, and the toy's image stage."""
