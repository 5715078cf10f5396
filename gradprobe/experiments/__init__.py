"""Experiments built from the library: the temporal trap on the toy, and whether a toy learns time."""
