"""MLflow tracking: one parent run per pipeline execution, one nested child run per stage.

Every pipeline stage is its own process, so the stages of one execution find their
common parent run through a "pipeline key" tag. The orchestrator that runs the stages
tells, as plain values (:class:`PipelineContext`), what it knows of the execution:

- its name for the execution (an experiment's name; the pipeline job's name for the
  Kubeflow Pipelines tasks of `cts kfp`, whose tasks each hold only their own params, so a
  params hash would give each its own parent): the key;
- otherwise the key is the git HEAD commit plus a hash of the params: a plain rerun after
  a params change gets a new parent.

A parent holds the results of its own execution only. It is seeded with the results of the
stages upstream of the stage that starts it (`upstream_metrics`: the outputs it reuses); every
other result is logged by its stage when that stage runs, so a parent whose execution fails
midway shows no figures of an earlier execution. A parent is named after what differs from
the committed params (`dusky-sick K=0`); its description, shown first on its page,
holds the headline figures (`HEADLINE`), and so do the tags and description of the model
version its `train_segmenter` registered.

Results have one name everywhere: `eval_ss.mIoU` on the eval_ss run and on the parent. On the
stage run they are logged at the stage's last step, after its curves. Keys of a results file
that are settings (batch size, iterations) are params of the stage run, not metrics.

A parent reads as one pipeline execution: RUNNING while a stage runs, ended with the end time
of its latest stage, FAILED or KILLED if a stage failed or was interrupted (an exception marks
the stage run FAILED, an interrupt (Ctrl-C, SIGTERM) KILLED). A SIGKILLed stage cannot end its
runs, so every run records its process (`cts.process`: host, pid, start time) and the next
stage of the experiment closes the RUNNING runs whose process is gone as FAILED. Finding or
creating the parent holds a file lock, so stages starting at once share one parent.

The default store is `sqlite:///<root>/mlruns.db` with artifacts in `<root>/mlartifacts`,
where root is the repository root the orchestrator gives (that of the original repository
even when the stage runs in a temporary copy of it).

A tracking server (`http(s)://...`) is never a stage's point of failure. MLflow's client
retries a failed request for minutes; inside a stage it retries twice and waits at most
20 s for an answer (a user's own MLFLOW_HTTP_REQUEST_* settings win). A server that does not
answer when the stage starts, or stops answering during it, is reported in one line on
stderr, and the stage goes on to its outputs: what it would have logged (runs, params,
metrics, artifacts, the model) is kept, in order, in `<root>/mlflow-spool/` (one JSONL
file per stage execution, copies of its files beside it). The kept records are logged as
soon as the server answers again: during the stage (it asks again every 30 s), when the
next stage starts, or with `cts replay` (:func:`replay_spool`). Each record is logged once:
progress is saved after every record, and a metric already in the run's history is not
logged again. A stage does not fail for an unreachable server, even at its start, because
it may have done its work before it opens its run (the evaluations score the whole set
first).

Modules: `store` (URI, artifact location, locks, reachability, the UI address), `naming`
(flattened keys, pipeline key, parent names), `parents` (the parent's finding, seeding,
life and headline), `spool` (offline records and their replay), `session` (`stage_run` and
the `log_*` functions).
"""

from cts.tracking.naming import (
    PipelineContext,
    changed_params,
    flatten,
    parent_run_name,
    pipeline_key,
    scalar_metrics,
)
from cts.tracking.parents import HEADLINE, close_stale_runs
from cts.tracking.session import (
    active_run,
    log_artifact,
    log_json_metrics,
    log_metrics_file,
    log_model,
    log_training_row,
    stage_run,
)
from cts.tracking.spool import SPOOL_DIR, kept_stage_runs, replay_spool
from cts.tracking.store import UI_BASE, tracking_uri, ui_url, unreachable

__all__ = [
    "HEADLINE",
    "SPOOL_DIR",
    "UI_BASE",
    "PipelineContext",
    "active_run",
    "changed_params",
    "close_stale_runs",
    "flatten",
    "kept_stage_runs",
    "log_artifact",
    "log_json_metrics",
    "log_metrics_file",
    "log_model",
    "log_training_row",
    "parent_run_name",
    "pipeline_key",
    "replay_spool",
    "scalar_metrics",
    "stage_run",
    "tracking_uri",
    "ui_url",
    "unreachable",
]
