"""The ``phyllome`` command as a user runs it: a fresh process per command, beside ``virsh``.

Starts nats-server and the four agents of one host (the vm agent on libvirt's test driver),
then runs ``phyllome vm list``, ``status``, ``storage volumes`` and ``--help`` as new
processes, alternately with ``virsh list`` on this host (``qemu:///system`` when libvirtd
answers, else the test driver) and ``python -c pass``; the median of ``--repeat`` runs
counts. The note of each row carries the load average, since the figures are wall times.
The CLI's modules are byte-compiled first, as an installed package is (a run with
PYTHONDONTWRITEBYTECODE would compile them from source in every process, about 30 ms).

    python -m bench.bench_cli [--quick] [--repeat 15]
    nice -n -10 python -m bench.run --only cli   # on a machine shared with other work

Under ``nice`` every process of the run (nats-server, the agents, the CLI, virsh) goes ahead
of the machine's other work, which is what "on an idle machine" asks; the note says so.

Prints markdown table rows: | path | ours | alternative | ratio (alternative / ours) |.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import Result, cpu_seconds  # noqa: E402
from shared.natsserver import NatsServer  # noqa: E402
from tests.support.agents import AgentProcess  # noqa: E402
from tests.support.libvirt import TEST_HOST_XML  # noqa: E402

COMMANDS = (("vm list", "< 150 ms idle, <= 5x virsh list"),
            ("status", "< 150 ms idle, <= 5x virsh list"),
            ("storage volumes", "-"), ("--help", "-"))


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Seconds from fork to exit of one run of ``argv`` (its output discarded), and the CPU
    seconds it used (which the other work on a shared machine inflates less)."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    took = time.perf_counter() - started
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 1):  # status exits 1 when an agent is unhealthy
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.decode(errors='replace')}")
    return took, now.ru_utime + now.ru_stime - used.ru_utime - used.ru_stime


def virsh_argv(work: Path) -> tuple[list[str], str]:
    """``virsh list`` against this host's libvirtd, or the test driver where none answers."""
    try:
        if subprocess.run(["virsh", "list"], capture_output=True, timeout=10).returncode == 0:
            return ["virsh", "list"], "virsh list"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return ["virsh", "-c", f"test://{work / 'host.xml'}", "list"], "virsh list, test driver"


async def start_agents(url: str, work: Path) -> list[AgentProcess]:
    procs = []
    for name, env in (("vm", {"PHYLLOME_LIBVIRT_URI": f"test://{work / 'host.xml'}"}),
                      ("storage", {}), ("hardware", {}), ("catalogue", {})):
        proc = AgentProcess(name, url, work / "state", host="bench", **env)
        procs.append(proc)
        await proc.start()
    return procs


def settle(pids: list[int], timeout: float = 120.0) -> None:
    """Wait until the agents are at rest (the catalogue reads osinfo-db for seconds after it
    answers): under 2% of a core each over half a second."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = [cpu_seconds(pid) for pid in pids]
        time.sleep(0.5)
        if all(cpu_seconds(pid) - b < 0.01 for pid, b in zip(pids, before, strict=True)):
            return
    raise SystemExit(f"the agents did not come to rest within {timeout:.0f} s")


def run(quick: bool = False, repeat: int = 15) -> list[Result]:
    repeat = 5 if quick else repeat
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        work = Path(tmp)
        (work / "host.xml").write_text(TEST_HOST_XML)
        server = NatsServer(work / "nats", port=-1)
        server.start()
        procs: list[AgentProcess] = []
        try:
            procs = asyncio.run(start_agents(server.url, work))
            settle([p.proc.pid for p in procs if p.proc is not None])
            for package in ("cli", "shared"):
                compileall.compile_dir(str(REPO / package), quiet=1)
            env = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
                   "PHYLLOME_NATS_URL": server.url, "PHYLLOME_HOST": "bench",
                   "PYTHONPATH": str(REPO)}
            virsh, virsh_name = virsh_argv(work)
            times: dict[str, list[tuple[float, float]]] = {c: [] for c, _ in COMMANDS}
            theirs, bare = [], []
            for _ in range(repeat):
                for command, _ in COMMANDS:
                    times[command].append(timed([sys.executable, "-m", "cli.main",
                                                 *command.split()], env))
                theirs.append(timed(virsh))
                bare.append(timed([sys.executable, "-c", "pass"]))
        finally:
            for p in procs:
                p.kill()
            server.stop()
    def ms(runs: list[tuple[float, float]], which: int = 0) -> float:
        return statistics.median(r[which] for r in runs) * 1000

    load = os.getloadavg()[0]
    niceness = os.nice(0)  # run under `nice -n -10` on a shared machine: said in the note

    def what(command: str) -> str:
        return "the help text (`--help`)" if command == "--help" else f"`phyllome {command}`"

    return [Result("CLI start-up + answer", f"{what(command)}, median of {repeat}",
                   ms(times[command]), ms(theirs), virsh_name, "ms", target,
                   note=f"CPU {ms(times[command], 1):.0f} ms, virsh's {ms(theirs, 1):.0f} ms; "
                        f"python -c pass {ms(bare):.0f} ms; load {load:.1f}"
                        + (f", at nice {niceness}" if niceness else ""))
            for command, target in COMMANDS]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    for r in run(args.quick, args.repeat):
        print(r.row())


if __name__ == "__main__":
    main()
