"""PatchCore (Roth et al., CVPR 2022) as pure functions on tensors; see DESIGN.md.

Public API: ModelSpec, fit, predict, save, load, load_images and the PatchCore model they return.
Importing this package does no work and never imports ray.
"""

from patchcore_core.model import PatchCore, Prediction, fit, load, load_images, predict, save
from patchcore_core.spec import ModelSpec

__all__ = ["ModelSpec", "PatchCore", "Prediction", "fit", "load", "load_images", "predict", "save"]
