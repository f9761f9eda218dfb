"""Stage 1: keypoint models, their preprocessing and decoding."""
