"""The gradprobe command line."""
