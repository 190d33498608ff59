"""Curvature-aware optax transforms: saddle escapes, curvature optimizers, monitoring.

All of them are :class:`optax.GradientTransformationExtraArgs` and compose with
:func:`optax.chain`; see each function's documentation.
"""

from hesskit._src.adahessian import AdaHessianState as AdaHessianState
from hesskit._src.adahessian import adahessian as adahessian
from hesskit._src.adahessian import spatial_average as spatial_average
from hesskit._src.newton import NewtonCGState as NewtonCGState
from hesskit._src.newton import SaddleFreeNewtonState as SaddleFreeNewtonState
from hesskit._src.newton import newton_cg as newton_cg
from hesskit._src.newton import saddle_free_newton as saddle_free_newton
from hesskit._src.saddle_transforms import CurvatureMonitorState as CurvatureMonitorState
from hesskit._src.saddle_transforms import NegativeCurvatureState as NegativeCurvatureState
from hesskit._src.saddle_transforms import PerturbState as PerturbState
from hesskit._src.saddle_transforms import SharpnessState as SharpnessState
from hesskit._src.saddle_transforms import SphereNoiseState as SphereNoiseState
from hesskit._src.saddle_transforms import add_sphere_noise as add_sphere_noise
from hesskit._src.saddle_transforms import monitor_curvature as monitor_curvature
from hesskit._src.saddle_transforms import negative_curvature as negative_curvature
from hesskit._src.saddle_transforms import noisy_sgd as noisy_sgd
from hesskit._src.saddle_transforms import perturb_near_saddle as perturb_near_saddle
from hesskit._src.saddle_transforms import scale_by_sharpness as scale_by_sharpness

__all__ = [
    "AdaHessianState",
    "CurvatureMonitorState",
    "NegativeCurvatureState",
    "NewtonCGState",
    "PerturbState",
    "SaddleFreeNewtonState",
    "SharpnessState",
    "SphereNoiseState",
    "adahessian",
    "add_sphere_noise",
    "monitor_curvature",
    "negative_curvature",
    "newton_cg",
    "noisy_sgd",
    "perturb_near_saddle",
    "saddle_free_newton",
    "scale_by_sharpness",
    "spatial_average",
]
