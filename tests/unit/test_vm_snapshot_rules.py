"""The vm agent's snapshot rules that need no agent: names, which disks, schedule times."""

from __future__ import annotations

import pytest

from services.vm import snapshots as vmsnap
from shared.errors import BadRequest, InvalidName
from shared.messages.vm import BackupSchedule, Disk, VmSpec


def test_schedule_runs_missed_during_downtime_once() -> None:
    s = BackupSchedule(uuid="u", vm="web", to="/b", every_s=100.0, next_run=1000.0)
    assert vmsnap.due([s], 999.0) == [] and vmsnap.due([s], 1000.0) == [s]
    assert vmsnap.next_run(s, 1001.0) == 1100.0  # on time: the cadence is kept
    assert vmsnap.next_run(s, 1550.0) == 1650.0  # five missed: once now, then a period on


def test_a_snapshot_copies_every_disk_but_shared_media_and_lives_in_the_first_pool() -> None:
    iso = Disk(path="/isos/debian.iso", readonly=True)
    spec = VmSpec(name="web", disks=[iso, Disk(pool="fast", volume="web-disk0", path="/p/a"),
                                     Disk(pool="slow", volume="web-data", path="/q/b")])
    pool, disks = vmsnap.copied_disks(spec)
    assert pool == "fast" and [d.volume for d in disks] == ["web-disk0", "web-data"]
    with pytest.raises(BadRequest, match="is a plain file, not a pool volume"):
        vmsnap.copied_disks(VmSpec(name="web", disks=[Disk(path="/var/web.raw")]))
    with pytest.raises(BadRequest, match="has no disk in a storage pool"):
        vmsnap.copied_disks(VmSpec(name="web", disks=[iso]))


@pytest.mark.parametrize("name", ["", "-x", ".x", "a/b", "a b", "x" * 65, "é", "a\nb"])
def test_bad_snapshot_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidName, match="snapshot name"):
        vmsnap.check_snapshot_name(name)
    assert vmsnap.check_snapshot_name("before-upgrade_2.0+1") == "before-upgrade_2.0+1"
