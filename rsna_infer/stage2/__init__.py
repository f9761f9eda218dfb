"""Stage 2: crops around keypoints and the grading models.

- `crops`: 2.5-D / 3-D ROI crops around voxel or patient-space points (`crop_2d5`,
  `crop_at_world`, `locate_point`);
- `layout`: the canonical ``[B, 5, 5, 3]`` output layout and keypoint -> target mapping;
- `tta`: flip TTA in patient directions (A/P, L/R with output swap-back);
- `augment`: training augmentation of crops;
- `fusion` (model1, `FusionFamily`) and `roi` (model2, `RoiFamily`): the grading families;
- `base`, `layers`: what the families share.

See docs/stage2.md.
"""
