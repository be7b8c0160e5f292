"""The runner's main names in one place (kept importable from here): the units, their fingerprints
and resuming live in :mod:`flatminima.experiment.units`, the record checks in
:mod:`flatminima.experiment.records`, the tables in :mod:`flatminima.experiment.tables`, the figures
in :mod:`flatminima.experiment.plots`, the HTML report in :mod:`flatminima.experiment.report`, the
loggers in :mod:`flatminima.experiment.loggers`; :func:`flatminima.experiment.run_experiment` drives
a run.
"""

from __future__ import annotations

from .experiment.plots import figures_skipped, write_continual_figures
from .experiment.records import record_group
from .experiment.results import write_config
from .experiment.tables import mean_matrices
from .experiment.units import Unit, fingerprint, plan_units

__all__ = ["Unit", "figures_skipped", "fingerprint", "mean_matrices", "plan_units", "record_group",
           "write_config", "write_continual_figures"]
