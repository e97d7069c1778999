"""The sweeps' shared kit (temporary: re-exports today's helpers of ``pipelines/tune.py``)."""
from pipelines.tune import collect_results, failed_trial, log_summary, make_tuner, markdown_table, trial_tracker  # noqa: F401
