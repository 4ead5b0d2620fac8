"""``phyllome vm share``/``unshare`` and the device flags of ``vm create``, run as a user
runs them against one real stack (NATS and the four agents of h1, libvirt's test driver)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.cli import Stack, phyllome, stack

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]
__all__ = ["stack"]


async def test_vm_share_and_unshare_change_a_stopped_vm(stack: Stack, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    done = await phyllome(stack.env, "vm", "create", "sharer", "--kernel", "/k", "--input",
                          "virtio")
    assert done.rc == 0, done.err
    done = await phyllome(stack.env, "vm", "share", "sharer", str(data), "data")
    assert done.rc == 0, done.err
    assert f"{data} as data" in done.out
    refusals = [
        (("share", "sharer", str(data), "data"), "already has a share tagged 'data'"),
        (("share", "sharer", str(data), "ro", "--readonly"), "drop --readonly"),
        (("share", "sharer", str(tmp_path / "nope"), "x"), "does not exist on this host"),
        (("share", "sharer", "relative", "x"), "must be absolute"),
        (("share", "sharer", str(data), "bad tag"), "share tag 'bad tag' is not valid"),
        (("unshare", "sharer", "other"), "has no share tagged 'other'"),
    ]
    for argv, message in refusals:
        done = await phyllome(stack.env, "vm", *argv)
        assert done.rc != 0 and message in done.err, (argv, done.err)
    done = await phyllome(stack.env, "vm", "unshare", "sharer", "data", "--json")
    assert done.rc == 0, done.err
    spec = json.loads(done.out)["spec"]
    assert (spec["shares"], spec["input"]) == ([], "virtio")
    assert (await phyllome(stack.env, "vm", "delete", "sharer")).rc == 0


async def test_vm_create_confidential_on_a_host_without_it_says_what_to_do(
        stack: Stack) -> None:
    done = await phyllome(stack.env, "vm", "create", "cc", "--confidential", "sev-snp",
                          "--kernel", "/k")
    assert done.rc != 0
    # under TCG (KVM unusable, as on CI's VMs) the accelerator refuses first, else the caps
    assert "needs KVM" in done.err or "no SEV-SNP" in done.err, done.err
    done = await phyllome(stack.env, "vm", "create", "cc", "--confidential", "sev",
                          "--firmware", "bios", "--kernel", "/k")
    assert done.rc != 0 and "use --firmware uefi" in done.err
