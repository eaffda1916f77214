"""Work kiln's job queue (and fire its schedules) as a long-lived Ray job.

    ray job submit --working-dir . -- python jobs/worker.py --address http://127.0.0.1:8265

Runs ``kiln worker --with-scheduler`` with the given arguments: queued jobs are
submitted back to the cluster as Ray jobs (they show in the dashboard's Jobs view)
when ``--address`` names the dashboard, or run as child processes of this job. The
queue's SQLite file stays on the head node, where Ray runs this job's driver.
Stop it with ``ray job stop``: the current job finishes or goes back to the queue.
"""

import sys

from kiln.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--with-scheduler" not in argv:
        argv.append("--with-scheduler")
    sys.exit(main(["worker", *argv]))
