"""Training: the toy's image stage (and, later, the Video-SFT callback and loop API)."""
