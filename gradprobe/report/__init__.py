"""Reports: plots of saved outputs (they read files through :mod:`gradprobe.outputs` only)."""
