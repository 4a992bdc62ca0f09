"""The columns of ``metrics.csv`` (written by ``greg evaluate``, read by ``greg report``), declared once.

Kept apart from ``greg.metrics`` so that the report side reads them without importing torch.
"""

from __future__ import annotations

# OOD metrics, in percent in metrics.csv
METRIC_COLUMNS = ["fpr95_idpos", "fpr95_oodpos", "auroc", "aupr_in", "aupr_out"]
# every column of metrics.csv, in order
TABLE_COLUMNS = ["ood_set", "n_id", "n_ood", "id_acc", *METRIC_COLUMNS]
# percentages (a value outside [0, 100] is a broken file) and sample counts (non-negative integers)
PERCENT_COLUMNS = ("id_acc", *METRIC_COLUMNS)
COUNT_COLUMNS = ("n_id", "n_ood")
