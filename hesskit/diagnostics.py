r"""Diagnostics of curvature: critical points, directional losses, spectra over training.

The analyses of Alain, Le Roux and Manzagol (2019) and of the curvature tutorials, as pure
functions on pytree parameters:

- :func:`critical_point_report` and :func:`classify`: the second-order test at a point
  (minimum, maximum, strict saddle, degenerate), condition number, largest stable step and the
  damping that makes the Hessian positive definite.
- :func:`step_check`: does a gradient step of a given size decrease the loss, and does its
  quadratic model agree?
- :func:`directional_loss` and :func:`eigen_directional_losses`: the loss along (eigen)
  directions on a grid of step sizes against its quadratic model; the optimal step
  :math:`\alpha^*` against :math:`1/\lambda`.
- :func:`compare_spectra`: eigenvalue differences, overlaps and principal angles between two
  sets of eigenpairs.
- :func:`adam_hessian_agreement`, :func:`preconditioner_agreement`,
  :func:`adam_second_moment` and :func:`empirical_fisher_diagonal`: Adam's
  :math:`\sqrt{v_t}` against Hessian, GGN and empirical Fisher diagonals, per layer.
- :class:`Tracker`: the extreme eigenpairs over training, warm-started and matched step to step.
- :func:`gd_rates`, :func:`regularized_spectrum`, :func:`condition_number`: what the spectrum
  implies for gradient descent and weight decay; :func:`svm_hinge_loss`, a convex test loss.
"""

from hesskit._src.compare import SpectrumComparison as SpectrumComparison
from hesskit._src.compare import compare_spectra as compare_spectra
from hesskit._src.compare import eigenvector_overlaps as eigenvector_overlaps
from hesskit._src.critical import CLASSES as CLASSES
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
from hesskit._src.preconditioner import PreconditionerAgreement as PreconditionerAgreement
from hesskit._src.preconditioner import adam_hessian_agreement as adam_hessian_agreement
from hesskit._src.preconditioner import adam_second_moment as adam_second_moment
from hesskit._src.preconditioner import empirical_fisher_diagonal as empirical_fisher_diagonal
from hesskit._src.preconditioner import preconditioner_agreement as preconditioner_agreement
from hesskit._src.tracking import Tracker as Tracker
from hesskit._src.tracking import TrackRecord as TrackRecord
from hesskit._src.tracking import match_pairs as match_pairs

__all__ = [
    "CLASSES",
    "CriticalPointReport",
    "DirectionalLoss",
    "GDRates",
    "PreconditionerAgreement",
    "RegularizedSpectrum",
    "SpectrumComparison",
    "StepCheck",
    "TrackRecord",
    "Tracker",
    "adam_hessian_agreement",
    "adam_second_moment",
    "classify",
    "compare_spectra",
    "condition_number",
    "critical_point_report",
    "directional_loss",
    "eigen_directional_losses",
    "eigenvector_overlaps",
    "empirical_fisher_diagonal",
    "gd_rates",
    "match_pairs",
    "preconditioner_agreement",
    "regularized_spectrum",
    "step_check",
    "svm_hinge_loss",
]
