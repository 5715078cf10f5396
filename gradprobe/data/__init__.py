"""Data: records, video decoding, frame samplers, and the ShapesWorld synthetic world."""
