"""`phyllome up --detach` / status / events / metrics / down, as a user runs them."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.debian import DebianImage

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def phyllome(*args: str, env: dict[str, str],
             timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def up_env(state: Path, host: str) -> dict[str, str]:
    """The environment of a `phyllome up` of its own: state dir, host name, free ports, TCG,
    no NATS URL (up starts its own server)."""
    env = {**os.environ, "PHYLLOME_STATE_DIR": str(state), "PHYLLOME_HOST": host,
           **{f"PHYLLOME_{a}_METRICS_PORT": "0" for a in ("HARDWARE", "VM", "STORAGE",
                                                           "CATALOGUE")},
           "PHYLLOME_ACCELERATOR": "tcg", "PHYLLOME_WEB_LISTEN": f"127.0.0.1:{free_port()}"}
    env.pop("PHYLLOME_NATS_URL", None)
    return env


def test_up_status_events_metrics_down(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = up_env(state, "uphost")
    up = phyllome("up", "--detach", "--no-demo", "--listen", "127.0.0.1:-1", env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        assert "phyllome is up on host uphost" in up.stdout
        web = f"http://{env['PHYLLOME_WEB_LISTEN']}"
        assert f"UI and API {web}/" in up.stdout
        assert httpx.get(f"{web}/api/v1/health").json()["host"] == "uphost"
        env["PHYLLOME_NATS_URL"] = (state / "run" / "nats_url").read_text()
        again = phyllome("up", "--detach", env=env)
        assert again.returncode == 0 and "already running" in again.stdout

        status = phyllome("status", "--json", env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        rows = json.loads(status.stdout)
        assert {(r["host"], r["agent"]) for r in rows} == {
            ("uphost", a) for a in ("hardware", "vm", "storage", "catalogue")}
        for r in rows:
            assert r["healthy"] and r["version"] and r["uptime_s"] >= 0
            assert httpx.get(r["metrics_url"]).status_code == 200
        table = phyllome("status", env=env)
        assert "HEALTHY" in table.stdout and table.stdout.count("uphost") == 4

        events = phyllome("events", "--since", "1h", "--json", env=env)
        started = [json.loads(line) for line in events.stdout.splitlines()]
        kinds = {e["event"]["agent"] for e in started if e["event"]["type"] == "agent.started.v1"}
        assert kinds == {"hardware", "vm", "storage", "catalogue"}
    finally:
        down = phyllome("down", env=env)
        assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    deadline = time.monotonic() + 10
    while (state / "run" / "up.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (state / "run" / "up.pid").exists()
    after = phyllome("status", env={**env, "PHYLLOME_CONNECT_WAIT": "0.5"})
    assert after.returncode == 3 and "cannot reach NATS" in after.stderr


def test_status_without_nats_says_so_and_exits_3(tmp_path: Path) -> None:
    env = {**os.environ, "PHYLLOME_NATS_URL": "nats://127.0.0.1:1", "PHYLLOME_CONNECT_WAIT": "0.3"}
    result = phyllome("status", env=env)
    assert result.returncode == 3
    assert "cannot reach NATS at nats://127.0.0.1:1" in result.stderr


def test_up_secure_agents_run_as_themselves_and_anonymous_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = up_env(state, "sechost")
    up = phyllome("up", "--detach", "--secure", "--no-demo", "--listen", "127.0.0.1:-1",
                  env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        assert "operator.env" in up.stdout
        env["PHYLLOME_NATS_URL"] = (state / "run" / "nats_url").read_text()
        anonymous = phyllome("status", env={**env, "PHYLLOME_CONNECT_WAIT": "1"})
        assert anonymous.returncode == 3, anonymous.stdout + anonymous.stderr
        operator = {**env}
        for line in (state / "secure" / "operator.env").read_text().splitlines():
            key, _, value = line.partition("=")
            operator[key] = value
        status = phyllome("status", "--json", env=operator)
        assert status.returncode == 0, status.stdout + status.stderr
        assert {r["agent"] for r in json.loads(status.stdout) if r["healthy"]} == {
            "hardware", "vm", "storage", "catalogue"}
        events = phyllome("events", "--json", env=operator)
        assert events.stdout.count("agent.started.v1") == 4
        assert "PHYLLOME_NATS_PASSWORD" not in (state / "logs" / "vm.log").read_text()
        # the web gateway: HTTPS with the host's certificate, as its own NATS identity; the
        # operator identity writes the tokens
        made = phyllome("web", "token", "create", "ops", "--role", "viewer", "--json",
                        env=operator)
        assert made.returncode == 0, made.stdout + made.stderr
        token = json.loads(made.stdout)["token"]
        web = f"https://{env['PHYLLOME_WEB_LISTEN']}"
        tls = ssl.create_default_context(cafile=str(state / "secure" / "ca.pem"))
        hosts = httpx.get(f"{web}/api/v1/hosts", verify=tls,
                          headers={"authorization": f"Bearer {token}"})
        assert [h["host"] for h in hosts.json()["hosts"]] == ["sechost"], hosts.text
        assert "PHYLLOME_NATS_PASSWORD" not in (state / "logs" / "web.log").read_text()
    finally:
        down = phyllome("down", env=env)
        assert down.returncode == 0


@pytest.mark.timeout(2400)  # the debian_image fixture may build the image first
def test_up_build_debian_builds_in_the_background_then_the_catalogue_has_it_pulled(
        tmp_path: Path, debian_image: DebianImage) -> None:
    """What `make up` runs: `phyllome up --detach --build-debian` serves at once, runs
    `deploy/setup.sh debian` in the background, then refreshes the catalogue and pulls the
    image. The build is the cached one here (the state dir holds the test session's build
    under the digest setup.sh computes), so this checks the path around it, not mmdebstrap."""
    state = tmp_path / "state"
    seeded = state / "images" / "builtin" / "phyllome-debian"
    seeded.mkdir(parents=True)
    for f in (debian_image.disk, debian_image.manifest):
        subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(f), str(seeded)],
                       check=True)
    digest = subprocess.run(["bash", "-c", "deploy/setup.sh debian_inputs | sha256sum"],
                            cwd=REPO, capture_output=True, text=True, check=True)
    (seeded / "inputs.sha256").write_text(digest.stdout.split()[0] + "\n")
    env = up_env(state, "debhost")
    up = phyllome("up", "--detach", "--no-demo", "--build-debian", "--listen", "127.0.0.1:-1",
                  env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        assert "phyllome-debian guest image: building in the background" in up.stdout
        env["PHYLLOME_NATS_URL"] = (state / "run" / "nats_url").read_text()
        deadline = time.monotonic() + 150
        local: dict[str, object] = {}
        while time.monotonic() < deadline:
            info = phyllome("images", "info", "phyllome-debian", "--json", env=env)
            if info.returncode == 0:
                local = json.loads(info.stdout).get("local") or {}
                if local.get("state") == "ready":
                    break
            time.sleep(1)
        assert local.get("state") == "ready", (local, (state / "logs" / "up.log").read_text())
        assert Path(str(local["path"])).stat().st_size == debian_image.disk.stat().st_size
        assert "phyllome-debian: built in" in (state / "logs" / "up.log").read_text()
        assert "building the phyllome-debian" not in \
            (state / "logs" / "debian-image.log").read_text()  # the cached build was kept
        events = phyllome("events", "--since", "1h", "--json", env=env)
        pulled = [json.loads(line)["event"] for line in events.stdout.splitlines()]
        assert any(e["type"].startswith("catalogue.image_pulled") and
                   e["image"]["id"] == "phyllome-debian" for e in pulled), events.stdout[-2000:]
    finally:
        down = phyllome("down", env=env)
        assert down.returncode == 0, down.stdout + down.stderr
