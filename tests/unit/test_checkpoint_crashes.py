"""A process that dies at every point of a checkpoint save leaves a loadable directory.

Each case saves epochs 1-3 here, then starts a child process that saves epoch 4 and
dies (``os._exit``) at one step of the save: inside the tensor files, after them,
inside ``metadata.json``, before the rename, before and after swapping in a same-epoch
save, before the manifest, before and during pruning. Afterwards ``resolve_checkpoint("latest")``
gives the previous committed checkpoint (or the new one once its rename committed it),
never a torn one; a new manager removes the leftovers and keeps best-k / last-n right.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kiln._fs import is_partial
from kiln.engine.checkpoint import CheckpointManager, load_checkpoint_state, resolve_checkpoint

# keep_last_n=2, keep_best_k=1 on val_loss (min): epoch 1 is the best throughout.
LOSSES = {1: 0.5, 2: 0.9, 3: 0.8, 4: 0.7, 5: 0.6}
KEEP = {"keep_best_k": 1, "keep_last_n": 2, "monitor": "val_loss", "mode": "min"}

# What each step of the save is replaced with in the child; ``DIE`` ends the process.
_CHILD = textwrap.dedent(
    """
    import os, sys
    import torch
    import kiln._fs as fs
    import kiln.engine.checkpoint as ck

    point, root, epoch, loss = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])

    def die(*args, **kwargs):
        os._exit(17)

    def torn_write(path, write):
        with open(path, "wb") as handle:  # half a file, never synced
            handle.write(b"PK\\x03\\x04 torn")
        die()

    def second_replace_dies(src, dst, real=os.replace, calls=[]):
        calls.append(src)
        if len(calls) == 2:  # the old save is aside, the new one not yet in place
            die()
        real(src, dst)

    def rmtree_dies(path, ignore_errors=False):
        os.unlink(os.path.join(path, "model.pt"))  # half-deleted, then gone
        die()

    if point == "mid_tensors":
        ck.write_synced = torn_write
    elif point == "after_tensors":
        ck.write_json_synced = die
    elif point == "mid_metadata":
        ck.write_json_synced = torn_write
    elif point == "before_rename":
        ck.publish_dir = die
    elif point == "before_swap":  # re-saving an epoch: the old one is still in place
        fs._exchange = die
    elif point == "aside_no_swap":  # a kernel without renameat2: the rename-aside path
        fs._exchange = lambda a, b: False
        os.replace = second_replace_dies
    elif point == "after_swap":  # the new one is in place, the old one not yet removed
        fs.shutil.rmtree = die
    elif point == "before_manifest":
        ck.CheckpointManager._write_manifest = die
    elif point == "before_prune":
        ck.remove_dir = die
    elif point == "mid_prune":
        fs.shutil.rmtree = rmtree_dies
    manager = ck.CheckpointManager(
        root, keep_best_k=1, keep_last_n=2, monitor="val_loss", mode="min"
    )
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, float(epoch))
    manager.save_checkpoint(epoch, {"val_loss": loss}, model)
    os._exit(0)  # the save finished: the crash point was never reached
    """
)

# point -> (epoch the child saves, latest afterwards, retained epochs after the new manager)
CASES = {
    "mid_tensors": (4, 3, [1, 2, 3]),
    "after_tensors": (4, 3, [1, 2, 3]),
    "mid_metadata": (4, 3, [1, 2, 3]),
    "before_rename": (4, 3, [1, 2, 3]),
    "before_swap": (3, 3, [1, 2, 3]),  # re-saving epoch 3: one whole epoch 3 either way
    "after_swap": (3, 3, [1, 2, 3]),
    "aside_no_swap": (3, 3, [1, 2, 3]),  # a new manager puts the old epoch 3 back
    "before_manifest": (4, 4, [1, 2, 3, 4]),  # renamed = committed; pruned at the next save
    "before_prune": (4, 4, [1, 3, 4]),
    "mid_prune": (4, 4, [1, 3, 4]),
}


def _model(value: float) -> torch.nn.Module:
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, value)
    return model


def _save(manager: CheckpointManager, epoch: int) -> None:
    manager.save_checkpoint(epoch, {"val_loss": LOSSES[epoch]}, _model(float(epoch)))


def _on_disk(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.is_dir()}


def _crash(root: Path, point: str, epoch: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, point, str(root), str(epoch), str(LOSSES[epoch])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 17, f"the child did not die at {point}: {proc.stderr[-2000:]}"


@pytest.mark.parametrize("point", sorted(CASES))
def test_crash_during_save(tmp_path, point):
    root = tmp_path / "checkpoints"
    with CheckpointManager(root, **KEEP) as manager:
        for epoch in (1, 2, 3):
            _save(manager, epoch)
    assert _on_disk(root) == {"epoch_0001", "epoch_0002", "epoch_0003"}
    child_epoch, latest_epoch, retained = CASES[point]
    _crash(root, point, child_epoch)

    # A reader that opens the directory as the crash left it: a whole checkpoint, never torn.
    latest = resolve_checkpoint("latest", root)
    # aside_no_swap: epoch 3 waits under *.old-* for a manager; the one before it is whole
    latest_epoch_now = 2 if point == "aside_no_swap" else latest_epoch
    assert latest.name == f"epoch_{latest_epoch_now:04d}"
    model_state, _, meta = load_checkpoint_state(latest)
    assert meta["epoch"] == latest_epoch_now
    assert torch.all(model_state["weight"] == float(latest_epoch_now))

    # A new manager removes the leftovers and keeps the bookkeeping.
    manager = CheckpointManager(root, **KEEP)
    assert not [n for n in _on_disk(root) if is_partial(n)], _on_disk(root)
    assert [c.epoch for c in manager.checkpoints] == retained
    assert _on_disk(root) == {f"epoch_{e:04d}" for e in retained}
    assert Path(manager.get_latest_checkpoint()).name == f"epoch_{latest_epoch:04d}"
    assert Path(manager.get_best_checkpoint()).name == "epoch_0001"
    model_state, _, meta = load_checkpoint_state(resolve_checkpoint("latest", root))
    assert torch.all(model_state["weight"] == float(latest_epoch))

    # The next save prunes to last-2 + best-1 as if nothing had happened.
    _save(manager, 5)
    manager.close()
    assert [c.epoch for c in manager.checkpoints] == [1, latest_epoch, 5]
    assert _on_disk(root) == {"epoch_0001", f"epoch_{latest_epoch:04d}", "epoch_0005"}
    assert resolve_checkpoint("latest", root).name == "epoch_0005"
    assert resolve_checkpoint("best", root).name == "epoch_0001"
