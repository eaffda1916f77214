"""`kiln queue`, `kiln schedule`: the commands a user pastes, and their errors."""

from __future__ import annotations

import pytest

from kiln.cli import main


@pytest.fixture()
def kiln(tmp_path, capsys):
    home = str(tmp_path / "home")

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["--home", home, *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def test_queue_submit_list_show_cancel_retry(kiln, tmp_path):
    run_file = tmp_path / "run.yaml"
    run_file.write_text("dataset: digits\nepochs: 1\n")
    assert kiln("queue", "submit", str(run_file), "--priority", "8")[1].startswith("job 1 queued")
    code, out, _ = kiln("queue", "submit", "--type", "noop", '{"seconds": 0}', "--depends-on", "1")
    assert code == 0 and "job 2 queued (noop, priority 5)" in out
    code, out, _ = kiln("queue", "list")
    assert code == 0 and "training" in out and "noop" in out and "pending" in out
    assert "attempt" in out and "worker" in out and "result" in out
    code, out, _ = kiln("queue", "show", "2")
    assert "depends_on: (1,)" in out and '{"seconds": 0}' in out
    assert kiln("queue", "cancel", "1")[1] == "job 1 cancelled\n"
    assert "cancelled" in kiln("queue", "list", "--status", "cancelled")[1]
    assert "failed" in kiln("queue", "show", "2")[1]  # its dependency will never complete
    assert kiln("queue", "retry", "1")[1] == "job 1 queued again\n"


def test_queue_errors_exit_2_with_the_reason(kiln):
    code, _, err = kiln(
        "queue", "submit", "--type", "evaluation", '{"model": "x@prod", "dataset": "digits"}'
    )
    assert code == 2 and "config.model='x@prod': no model named 'x'" in err
    code, _, err = kiln("queue", "submit", "--priority", "0", "--type", "noop", "{}")
    assert code == 2 and "priority=0" in err
    code, _, err = kiln("queue", "submit", "missing.yaml")
    assert code == 2 and "neither an existing file nor an inline mapping" in err
    code, _, err = kiln("queue", "cancel", "9")
    assert code == 2 and "no job with id 9" in err
    assert kiln("queue", "decisions")[1] == "no retraining decisions recorded\n"


def test_schedule_commands(kiln):
    code, out, _ = kiln(
        "schedule", "add", "nightly", "--cron", "30 2 * * *", "--tz", "Europe/Berlin",
        "--type", "noop", '{"seconds": 0}',
    )  # fmt: skip
    assert (
        code == 0
        and "schedule 'nightly' (id 1) added; next fire" in out
        and "02:30:00+01:00" in out
    )
    assert "nightly" in kiln("schedule", "list")[1]
    code, out, _ = kiln("schedule", "next", "nightly", "-n", "2")
    assert len(out.splitlines()) == 2 and all(
        "T02:30:00+01:00" in line for line in out.splitlines()
    )
    assert kiln("schedule", "trigger", "nightly")[1] == "schedule 'nightly': job 1 queued\n"
    assert kiln("schedule", "pause", "1")[1] == "schedule '1' paused\n"  # ids work too
    assert "True" in kiln("schedule", "list")[1]
    assert kiln("schedule", "resume", "nightly")[0] == 0
    code, _, err = kiln("schedule", "add", "nightly", "--cron", "0 3 * * *", "--type", "noop", "{}")
    assert code == 2 and "already schedule 1" in err
    code, _, err = kiln(
        "schedule", "add", "x", "--cron", "every day", "--tz", "Nowhere", "--type", "noop", "{}"
    )
    assert code == 2 and "not a cron expression" in err and "timezone='Nowhere'" in err
    assert kiln("schedule", "remove", "nightly")[1] == "schedule 'nightly' removed\n"
    assert kiln("schedule", "list")[1] == "no schedules\n"
