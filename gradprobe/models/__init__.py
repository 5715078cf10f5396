"""Model adapters (one per family, registered by :func:`gradprobe.models.registry.register`), tiny
checkpoints built offline, and the toy."""
