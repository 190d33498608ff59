"""hesskit: the curvature of loss functions in JAX.

Hessian-vector products, extreme eigenpairs, traces, diagonals and spectral densities of
Hessians on pytrees, and optax transforms that use curvature.
"""

from hesskit._src.adahessian import adahessian as adahessian
from hesskit._src.compare import SpectrumComparison as SpectrumComparison
from hesskit._src.compare import compare_spectra as compare_spectra
from hesskit._src.critical import CriticalPointReport as CriticalPointReport
from hesskit._src.critical import classify as classify
from hesskit._src.critical import critical_point_report as critical_point_report
from hesskit._src.curvature_effects import GDRates as GDRates
from hesskit._src.curvature_effects import RegularizedSpectrum as RegularizedSpectrum
from hesskit._src.curvature_effects import condition_number as condition_number
from hesskit._src.curvature_effects import gd_rates as gd_rates
from hesskit._src.curvature_effects import regularized_spectrum as regularized_spectrum
from hesskit._src.curvature_effects import svm_hinge_loss as svm_hinge_loss
from hesskit._src.directional import DirectionalLoss as DirectionalLoss
from hesskit._src.directional import StepCheck as StepCheck
from hesskit._src.directional import directional_loss as directional_loss
from hesskit._src.directional import eigen_directional_losses as eigen_directional_losses
from hesskit._src.directional import step_check as step_check
from hesskit._src.krylov import Status as Status
from hesskit._src.linsolve import SolveResult as SolveResult
from hesskit._src.linsolve import solve as solve
from hesskit._src.memory import InsufficientMemoryError as InsufficientMemoryError
from hesskit._src.newton import newton_cg as newton_cg
from hesskit._src.newton import saddle_free_newton as saddle_free_newton
from hesskit._src.operators import LinearOperator as LinearOperator
from hesskit._src.operators import fd_hvp as fd_hvp
from hesskit._src.operators import ggn_operator as ggn_operator
from hesskit._src.operators import hessian_operator as hessian_operator
from hesskit._src.operators import hvp as hvp
from hesskit._src.operators import mean_hessian_operator as mean_hessian_operator
from hesskit._src.operators import restrict as restrict
from hesskit._src.operators import tree_mask_embed as tree_mask_embed
from hesskit._src.operators import tree_mask_select as tree_mask_select
from hesskit._src.power_method import power_iteration as power_iteration
from hesskit._src.preconditioner import adam_hessian_agreement as adam_hessian_agreement
from hesskit._src.preconditioner import adam_second_moment as adam_second_moment
from hesskit._src.preconditioner import preconditioner_agreement as preconditioner_agreement
from hesskit._src.saddle_transforms import add_sphere_noise as add_sphere_noise
from hesskit._src.saddle_transforms import monitor_curvature as monitor_curvature
from hesskit._src.saddle_transforms import negative_curvature as negative_curvature
from hesskit._src.saddle_transforms import noisy_sgd as noisy_sgd
from hesskit._src.saddle_transforms import perturb_near_saddle as perturb_near_saddle
from hesskit._src.saddle_transforms import scale_by_sharpness as scale_by_sharpness
from hesskit._src.slq import Density as Density
from hesskit._src.slq import spectral_density as spectral_density
from hesskit._src.stochastic import Estimate as Estimate
from hesskit._src.stochastic import diagonal as diagonal
from hesskit._src.stochastic import trace as trace
from hesskit._src.thick_restart import EigResult as EigResult
from hesskit._src.thick_restart import eigsh as eigsh
from hesskit._src.tracking import Tracker as Tracker
from hesskit._src.tracking import TrackRecord as TrackRecord
from hesskit._src.tree import tree_add as tree_add
from hesskit._src.tree import tree_axpy as tree_axpy
from hesskit._src.tree import tree_dim as tree_dim
from hesskit._src.tree import tree_matvec as tree_matvec
from hesskit._src.tree import tree_norm as tree_norm
from hesskit._src.tree import tree_normalize as tree_normalize
from hesskit._src.tree import tree_random_normal as tree_random_normal
from hesskit._src.tree import tree_random_rademacher as tree_random_rademacher
from hesskit._src.tree import tree_random_sphere as tree_random_sphere
from hesskit._src.tree import tree_rmatvec as tree_rmatvec
from hesskit._src.tree import tree_scale as tree_scale
from hesskit._src.tree import tree_stack as tree_stack
from hesskit._src.tree import tree_sub as tree_sub
from hesskit._src.tree import tree_unstack as tree_unstack
from hesskit._src.tree import tree_vdot as tree_vdot
from hesskit._src.tree import tree_zeros_like as tree_zeros_like
from hesskit._src.tridiag import LanczosResult as LanczosResult
from hesskit._src.tridiag import lanczos as lanczos

# The package's one version string: pyproject.toml reads it from here (hatch's version source).
__version__ = "0.1.0"

# Submodules as attributes. transforms and diagnostics only re-export what is imported above;
# examples (flax.linen) and plots (matplotlib, an optional extra) load on first access (PEP 562),
# so `import hesskit` imports neither.
from hesskit import diagnostics as diagnostics  # noqa: E402
from hesskit import transforms as transforms  # noqa: E402

_LAZY_SUBMODULES = ("examples", "plots")


def __getattr__(name: str):
    """Import ``hesskit.examples`` and ``hesskit.plots`` on first attribute access."""
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"hesskit.{name}")
    msg = f"module 'hesskit' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))


# Names are grouped by the issue/module that adds them; keep each group sorted.
__all__ = [
    # operators
    "LinearOperator",
    "fd_hvp",
    "ggn_operator",
    "hessian_operator",
    "hvp",
    "mean_hessian_operator",
    "preconditioner_agreement",
    "adam_hessian_agreement",
    "adam_second_moment",
    "restrict",
    "tree_mask_embed",
    "tree_mask_select",
    # pytree linear algebra
    "tree_add",
    "tree_axpy",
    "tree_dim",
    "tree_matvec",
    "tree_norm",
    "tree_normalize",
    "tree_random_normal",
    "tree_random_rademacher",
    "tree_random_sphere",
    "tree_rmatvec",
    "tree_scale",
    "tree_stack",
    "tree_sub",
    "tree_unstack",
    "tree_vdot",
    "tree_zeros_like",
    # eigensolvers and estimators
    "Density",
    "EigResult",
    "Estimate",
    "InsufficientMemoryError",
    "LanczosResult",
    "SolveResult",
    "Status",
    "diagonal",
    "eigsh",
    "lanczos",
    "power_iteration",
    "solve",
    "spectral_density",
    "trace",
    # transforms
    "add_sphere_noise",
    "monitor_curvature",
    "negative_curvature",
    "noisy_sgd",
    "perturb_near_saddle",
    # curvature optimizers (issue 14)
    "adahessian",
    "newton_cg",
    "saddle_free_newton",
    "scale_by_sharpness",
    # diagnostics
    "CriticalPointReport",
    "DirectionalLoss",
    "GDRates",
    "RegularizedSpectrum",
    "SpectrumComparison",
    "StepCheck",
    "TrackRecord",
    "Tracker",
    "classify",
    "compare_spectra",
    "condition_number",
    "critical_point_report",
    "directional_loss",
    "eigen_directional_losses",
    "gd_rates",
    "regularized_spectrum",
    "step_check",
    "svm_hinge_loss",
]
