"""Stage 2: crops around keypoints and the grading models."""
