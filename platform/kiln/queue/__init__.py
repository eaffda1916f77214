"""Automation: a job queue, a cron scheduler, retraining triggers and the retraining loop.

kiln decides *what* runs *when*; Ray runs it. Jobs wait in kiln's SQLite file
(priorities, retries with backoff, leases, fencing); a :class:`JobExecutor` claims
them and runs each as a Ray job (``JobSubmissionClient``) or a child process.

    from kiln.queue import JobExecutor, JobManager, TrainingScheduler
    manager = JobManager()                              # $KILN_HOME/kiln.db
    job_id = manager.submit_job("training", "examples/digits_mlp.yaml", priority=7)
    TrainingScheduler().create_schedule("nightly", "training", "examples/digits_mlp.yaml",
                                        "0 2 * * *", timezone="Europe/Berlin")
    JobExecutor(manager).run_worker(idle_exit_s=60)
"""

from kiln._lazy import lazy_exports

_EXPORTS = {
    "CatchUp": "kiln.queue.scheduler",
    "Job": "kiln.queue.jobs",
    "JobExecutor": "kiln.queue.executor",
    "JobManager": "kiln.queue.manager",
    "JobStatus": "kiln.queue.jobs",
    "JobType": "kiln.queue.jobs",
    "RetrainingTrigger": "kiln.queue.triggers",
    "Schedule": "kiln.queue.scheduler",
    "TrainingScheduler": "kiln.queue.scheduler",
    "TriggerDecision": "kiln.queue.triggers",
    "retrain_decisions": "kiln.queue.retraining",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
