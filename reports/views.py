"""What the report shows, as plain data for the templates and the exports. One module per view:

* reports.groups      the groups of runs ranked together, their columns and composites;
* reports.ranking     the overview (rank groups from the pairwise tests, equal footing);
* reports.compare     paired comparisons: the baseline table, the pairwise matrices;
* reports.verdicts    the lines that open each group;
* reports.heldout     the held-out view and the teacher-forced against wild gap;
* reports.crossmodel  each editor across models;
* reports.sequential  checkpoints of sequential runs (table and curves);
* reports.cases       the drill-down rows.

This module re-exports their public names.
"""

from reports.cases import FAILURE_RULE, case_rows, failure_reasons
from reports.compare import DEFAULT_BASELINE, Pairing, comparison, pairwise, resolve_baseline
from reports.crossmodel import cross_model, kendall_tau
from reports.groups import (COMPOSITES, FAMILIES, LOCALITY_TYPE, METRIC_ABBR, METRICS, Column, Group,
                            composite_cell, family_of, make_groups, segments, task_columns, task_seed)
from reports.heldout import HOLDOUT_RULE, heldout_tasks, holdout_view, protocol_gap
from reports.ranking import RANK_RULE, overall_score, overview
from reports.sequential import CURVE_METRICS, sequential_curves
from reports.verdicts import verdicts

__all__ = ["FAILURE_RULE", "case_rows", "failure_reasons", "DEFAULT_BASELINE", "Pairing", "comparison",
           "pairwise", "resolve_baseline", "cross_model", "kendall_tau", "COMPOSITES", "FAMILIES",
           "LOCALITY_TYPE", "METRIC_ABBR", "METRICS", "Column", "Group", "composite_cell", "family_of",
           "make_groups", "segments", "task_columns", "task_seed", "HOLDOUT_RULE", "heldout_tasks",
           "holdout_view", "protocol_gap", "RANK_RULE", "overall_score", "overview", "CURVE_METRICS",
           "sequential_curves", "verdicts"]
