"""Clear-signed (GPG) index files, checked with ``gpgv`` against a keyring the source names.

A source that names a keyring is read only through this check. Only what gpgv says was
signed reaches a parser: gpgv writes the signed text itself (``--output -``), so text
outside the signed block (a prefix, a second message glued on) is dropped, and nothing is
used when the signature is bad, missing, or made by a key that is not in the keyring.
gpgv trusts every key of the keyring it is given and reads no other (an empty home
directory per call), so the operator's or root's own keys never count::

    payload = verify_clearsigned(data, "/etc/phyllome/keyrings/lab.gpg",
                                 "http://mirror.lan/streams/v1/index.sjson", timeout_s=30)
"""

from __future__ import annotations

import os
import subprocess
import tempfile

from shared.errors import BadRequest, Forbidden, Timeout, Unavailable

GPGV = "gpgv"
CLEARSIGN_HEADER = b"-----BEGIN PGP SIGNED MESSAGE-----"
# gpgv's lines that say nothing about why a check failed
_NOISE = ("Signature made", "Please remember", "should be the first")


def check_keyring(path: str) -> None:
    """BadRequest unless ``path`` is an absolute path to a readable file (a binary keyring,
    as ``gpg --export`` writes it)."""
    how = ("export the key the source signs with: gpg --export KEYID > FILE (binary, not "
           "--armor), and name that file")
    if not os.path.isabs(path):
        raise BadRequest(f"keyring {path!r} is not an absolute path; {how}")
    if not os.path.isfile(path):
        raise BadRequest(f"keyring {path} does not exist on this host; {how}")
    if not os.access(path, os.R_OK):
        raise BadRequest(f"keyring {path} is not readable by the catalogue agent; fix its "
                         "permissions")


def verify_clearsigned(data: bytes, keyring: str, url: str, timeout_s: float) -> bytes:
    """The signed text of ``data`` (fetched from ``url``) once gpgv has verified it against
    ``keyring``; blocking (call it in a thread). Forbidden when the signature does not
    verify, BadRequest for a keyring that is not there, Unavailable without gpgv."""
    check_keyring(keyring)
    if not data.lstrip().startswith(CLEARSIGN_HEADER):
        raise Forbidden(f"{url} is not clear-signed (no '{CLEARSIGN_HEADER.decode()}'), but "
                        f"the source names keyring {keyring}: the server does not sign this "
                        "file, or this is not the server you meant; check the source's URL")
    with tempfile.TemporaryDirectory(prefix="phyllome-gpgv-") as home:
        try:
            proc = subprocess.run(
                [GPGV, "--homedir", home, "--keyring", keyring, "--output", "-", "-"],
                input=data, capture_output=True, timeout=timeout_s, check=False)
        except FileNotFoundError:
            raise Unavailable("gpgv is not installed, and this source's index is signed: "
                              "install it (apt-get install gpgv) and refresh") from None
        except subprocess.TimeoutExpired:
            raise Timeout(f"gpgv did not check the signature of {url} within {timeout_s:g} s; "
                          "try again, or raise [catalogue] gpgv_timeout_s") from None
    if proc.returncode != 0:
        said = [line.removeprefix("gpgv:").strip()
                for line in proc.stderr.decode(errors="replace").splitlines()]
        why = "; ".join(" ".join(s.split()) for s in said if s and not s.startswith(_NOISE))
        meaning = ("the file was changed after it was signed" if "BAD signature" in why else
                   "it is signed by a key that is not in the keyring" if "No public key" in why
                   else "it could not be checked")
        raise Forbidden(
            f"the signature of {url} does not verify against keyring {keyring} ({why}): "
            f"{meaning}, so nothing in it is used. Check the source's URL, and that the "
            f"keyring holds the source's signing key (gpg --show-keys {keyring})")
    return proc.stdout
