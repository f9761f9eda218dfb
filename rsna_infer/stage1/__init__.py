"""Stage 1: keypoint models, their preprocessing and decoding.

Modules: `keypoints` (sets, the shared contract), `common` (point-regression machinery),
`sag2d`, `sag3d`, `axial3d`, `axial_level` (families; see `rsna_infer.models.registry`), `nets`
(networks), `assemble` (combining decoded sets, cross-view check, projection fallback),
`chain` (the one stage-1 chain: fold mean, decode, merge, finalize; one study end to end).
Importing this package does not import torch.
"""
