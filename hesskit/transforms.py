"""Curvature-aware optax transforms: saddle-escaping noise, negative-curvature steps, monitoring.

All of them are :class:`optax.GradientTransformationExtraArgs` and compose with
:func:`optax.chain`; see each function's documentation.
"""

from hesskit._src.saddle_transforms import CurvatureMonitorState as CurvatureMonitorState
from hesskit._src.saddle_transforms import NegativeCurvatureState as NegativeCurvatureState
from hesskit._src.saddle_transforms import PerturbState as PerturbState
from hesskit._src.saddle_transforms import SphereNoiseState as SphereNoiseState
from hesskit._src.saddle_transforms import add_sphere_noise as add_sphere_noise
from hesskit._src.saddle_transforms import monitor_curvature as monitor_curvature
from hesskit._src.saddle_transforms import negative_curvature as negative_curvature
from hesskit._src.saddle_transforms import noisy_sgd as noisy_sgd
from hesskit._src.saddle_transforms import perturb_near_saddle as perturb_near_saddle

__all__ = [
    "CurvatureMonitorState",
    "NegativeCurvatureState",
    "PerturbState",
    "SphereNoiseState",
    "add_sphere_noise",
    "monitor_curvature",
    "negative_curvature",
    "noisy_sgd",
    "perturb_near_saddle",
]
