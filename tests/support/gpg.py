"""A throwaway GPG signing key for tests: the keyring a source names, files clear-signed.

Real ``gpg`` (a key made in a fresh home, never the machine's) and, on the agent's side,
real ``gpgv``; with ``CI`` set a missing binary fails the test instead of skipping it::

    with Signer(tmp_path / "gpg", "Lab images") as signer:
        signer.keyring                                  # binary keyring (gpg --export)
        signer.clearsign(root / "index.json")           # writes index.sjson beside it
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import TracebackType

from tests.support.require import require_binary


class Signer:
    """One ed25519 signing key in its own GNUPGHOME (its gpg-agent is stopped on close)."""

    def __init__(self, home: Path, name: str) -> None:
        self.gpg = require_binary("gpg")
        require_binary("gpgv")  # what the agent checks with
        home.mkdir(mode=0o700, parents=True)
        self.env = {**os.environ, "GNUPGHOME": str(home)}
        self._run("--quick-gen-key", f"{name} <signer@phyllome.invalid>", "ed25519", "sign",
                  "never")
        self.keyring = home / "trusted.gpg"
        self.keyring.write_bytes(self._run("--export"))

    def clearsign(self, path: Path) -> Path:
        """``x.json`` clear-signed as ``x.sjson`` beside it."""
        signed = path.with_suffix(".sjson")
        self._run("--clearsign", "--output", str(signed), str(path))
        return signed

    def close(self) -> None:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=self.env, check=False,
                       capture_output=True, timeout=30)

    def __enter__(self) -> Signer:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _run(self, *args: str) -> bytes:
        return subprocess.run(
            [self.gpg, "--batch", "--yes", "--quiet", "--pinentry-mode", "loopback",
             "--passphrase", "", *args],
            env=self.env, check=True, capture_output=True, timeout=60).stdout
