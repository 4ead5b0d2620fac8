"""A blocking NATS client on a plain socket, for the CLI's one-shot requests.

``phyllome vm list`` is one request and one reply; ``phyllome status`` one KV read and one
ping. nats-py and asyncio take about 75 ms to import on this kind of machine, more than the
whole command may take (docs/benchmarks.md: under 150 ms, at most 5x ``virsh list``), so
these commands speak the NATS text protocol here instead: ``INFO``, TLS when the server asks
for it, ``CONNECT`` with the same identity ``shared.bus.Bus`` would use (user and password;
a JWT credentials file needs the nkeys package, as in nats-py), one ``_INBOX`` subscription
for replies, ``HPUB``/``PUB`` and ``MSG``/``HMSG`` back. A request's headers and body and
its reply's typed error come from ``shared.wire``, as in ``Bus.request``; commands that
follow jobs or events keep nats-py.

    with SyncBus.connect(url, name="phyllome-cli", user="operator", password="...") as bus:
        vms = bus.call("h1", vm_api.LIST, VmListRequest(), timeout=10)
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from shared import subjects, wire
from shared.errors import BadRequest, NotAuthorized, PayloadTooLarge, PhyError, Unavailable
from shared.messages import EndpointSpec

Req = TypeVar("Req")
Resp = TypeVar("Resp")
CRLF = b"\r\n"
HANDSHAKE_S = 2.0  # as Bus.connect's connect_timeout
KV_BATCH = 1000  # records per pull of a KV read, as Bus._read_bucket
JS_STREAM_NOT_FOUND = 10059


@dataclass(frozen=True)
class Msg:
    """A message delivered to one of our subscriptions."""

    subject: str
    reply: str
    headers: dict[str, str] | None
    data: bytes


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    tls: bool  # tls:// asked for it
    user: str
    password: str


def servers_of(url: str) -> list[Server]:
    """The servers of a NATS URL (comma-separated, ``nats://`` or ``tls://``, the scheme and
    port optional, user:password@ allowed), as nats-py reads it."""
    out = []
    for one in (u.strip() for u in url.split(",")):
        if not one:
            continue
        parsed = urlsplit(one if "://" in one else f"nats://{one}")
        if parsed.scheme not in ("nats", "tls"):
            raise BadRequest(f"NATS URL {one!r}: the scheme must be nats:// or tls://")
        try:
            port = parsed.port or 4222
        except ValueError:
            raise BadRequest(f"NATS URL {one!r}: the port is not a number") from None
        out.append(Server(parsed.hostname or "127.0.0.1", port, parsed.scheme == "tls",
                          parsed.username or "", parsed.password or ""))
    if not out:
        raise BadRequest("no NATS URL given (PHYLLOME_NATS_URL or --nats)")
    return out


def parse_headers(raw: bytes) -> dict[str, str]:
    """``NATS/1.0 503 No Responders\\r\\nKey: value\\r\\n...`` as nats-py reads it: the status
    code under ``Status``, its text under ``Description``."""
    first, *lines = raw.decode("utf-8", "replace").split("\r\n")
    headers: dict[str, str] = {}
    status = first.removeprefix("NATS/1.0").strip()
    if status:
        code, _, description = status.partition(" ")
        headers[wire.STATUS_HEADER] = code
        if description:
            headers["Description"] = description
    for line in lines:
        key, sep, value = line.partition(":")
        if sep and key.strip():
            headers[key.strip()] = value.strip()
    return headers


def encode_headers(headers: dict[str, str]) -> bytes:
    return ("NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + "\r\n").encode()


class SyncBus:
    """One NATS connection, blocking: requests, a gathered reply, KV reads. Not for threads."""

    def __init__(self, sock: socket.socket, *, url: str, identity: str, info: dict[str, Any]):
        self.sock = sock
        self.url = url
        self.identity = identity or "anonymous"
        self.max_payload = int(info.get("max_payload") or 1 << 20)
        self._buf = bytearray()
        self._inbox = f"_INBOX.{os.urandom(10).hex()}"
        self._sids = 1
        self._tokens = 0
        self._mail: dict[str, deque[Msg]] = {}  # by reply subject, or "#<sid>" for a sub

    # -- connection -------------------------------------------------------------------------

    @classmethod
    def connect(cls, url: str, *, name: str, give_up_after: float = 3.0, user: str = "",
                password: str = "", creds: str = "", ca: str = "") -> SyncBus:
        """Connect to the first server of ``url`` that answers, retrying with backoff for
        ``give_up_after`` seconds while none does (as ``Bus.connect``)."""
        servers = servers_of(url)
        identity = wire.identity_of(user or servers[0].user, creds)
        started, delay = time.monotonic(), 0.1
        while True:
            for server in servers:
                try:
                    sock = socket.create_connection((server.host, server.port), HANDSHAKE_S)
                except OSError:
                    continue
                try:
                    return cls._handshake(sock, server, url=url, name=name, identity=identity,
                                          user=user, password=password, creds=creds, ca=ca)
                except BaseException:
                    sock.close()
                    raise
            if time.monotonic() - started + delay > give_up_after:
                raise wire.unreachable(url)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    @classmethod
    def _handshake(cls, sock: socket.socket, server: Server, *, url: str, name: str,
                   identity: str, user: str, password: str, creds: str, ca: str) -> SyncBus:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = time.monotonic() + HANDSHAKE_S
        first = _Reader(sock)
        try:
            line = first.line(deadline)
        except TimeoutError:
            raise Unavailable(f"cannot connect to NATS at {url}: no answer to the handshake "
                              f"in {HANDSHAKE_S:g} s") from None
        try:
            info: dict[str, Any] = json.loads(line.removeprefix(b"INFO "))
            if not line.startswith(b"INFO ") or not isinstance(info, dict):
                raise ValueError(line[:40])
        except ValueError:
            raise Unavailable(f"cannot connect to NATS at {url}: {server.host}:{server.port} "
                              "does not speak NATS") from None
        tls = bool(info.get("tls_required") or server.tls or (ca and info.get("tls_available")))
        if tls:
            import ssl  # 7 ms: only for a server that wants TLS

            context = ssl.create_default_context(cafile=ca or None)
            try:
                sock = context.wrap_socket(sock, server_hostname=server.host)
            except ssl.SSLCertVerificationError:
                raise NotAuthorized(f"cannot connect to NATS at {url}: "
                                    + wire.turned_away_because(True, identity, ca)) from None
            except (OSError, ssl.SSLError) as e:
                raise Unavailable(f"cannot connect to NATS at {url}: TLS failed: {e}") from None
        options: dict[str, Any] = {
            "verbose": False, "pedantic": False, "tls_required": tls, "name": name,
            "lang": "python3", "version": "phyllome-cli", "protocol": 1, "headers": True,
            "no_responders": True}
        if creds:
            options.update(_signed_jwt(creds, str(info.get("nonce", ""))))
        elif user or server.user:
            options.update(user=user or server.user,
                           **{"pass": password if user else server.password})
        bus = cls(sock, url=url, identity=identity, info=info)
        bus._send(b"CONNECT " + json.dumps(options).encode() + b"\r\nPING\r\n")
        try:
            while True:
                op = bus._read_op(deadline)
                if op == "PONG":
                    bus._send(f"SUB {bus._inbox}.* 1\r\n".encode())  # where replies come
                    return bus
                if isinstance(op, _Err):
                    why = wire.turned_away_because(False, identity, ca) \
                        if "authoriz" in op.text.lower() else op.text
                    raise NotAuthorized(f"cannot connect to NATS at {url}: {why}")
        except TimeoutError:
            raise Unavailable(f"cannot connect to NATS at {url}: no answer to the handshake "
                              f"in {HANDSHAKE_S:g} s") from None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SyncBus:
        return self

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------------------

    def call(self, host: str, spec: EndpointSpec[Req, Resp], req: Req, *,
             timeout: float = 10.0, idempotency_key: str | None = None) -> Resp:
        """Call ``spec`` on its agent of ``host``, as ``Bus.call``."""
        return cast(Resp, self.request(subjects.command(host, spec.service, spec.verb), req,
                                       spec.response, timeout=timeout,
                                       idempotency_key=idempotency_key))

    def request(self, subject: str, req: Any, resp_type: type, *, timeout: float = 10.0,
                idempotency_key: str | None = None) -> Any:
        """One request-reply, its errors typed as ``Bus.request`` types them."""
        headers, payload = wire.request_parts(req, idempotency_key)
        msg = self._request(subject, payload, headers, timeout)
        if msg is None:
            raise wire.timed_out(subject, timeout)
        return wire.reply_value(msg.headers, msg.data, resp_type)

    def gather(self, subject: str, *, window: float,
               enough: Callable[[list[bytes]], bool] | None = None) -> list[bytes]:
        """Every reply to one publish on ``subject`` within ``window`` seconds, or until
        ``enough(replies)`` says they are all in."""
        reply = self._reply_subject()
        self._publish(subject, b"", reply, None)
        deadline = time.monotonic() + window
        out: list[bytes] = []
        try:
            while not (enough is not None and enough(out)):
                msg = self._next(reply, subject, deadline)
                if msg is None:
                    break
                out.append(msg.data)
        finally:
            self._mail.pop(reply, None)
        return out

    def _request(self, subject: str, payload: bytes, headers: dict[str, str] | None,
                 timeout: float) -> Msg | None:
        reply = self._reply_subject()
        self._publish(subject, payload, reply, headers)
        try:
            msg = self._next(reply, subject, time.monotonic() + timeout)
        finally:
            self._mail.pop(reply, None)
        if msg is not None and (msg.headers or {}).get(wire.STATUS_HEADER) == \
                wire.NO_RESPONDERS and not msg.data:
            raise wire.no_responders(subject)
        return msg

    # -- KV -----------------------------------------------------------------------------------

    def kv_entries(self, bucket: str, keys: str = ">", *,
                   timeout: float = 5.0) -> list[tuple[str, int, bytes]]:
        """(key, revision, value) of every live key of a KV bucket that matches ``keys`` (a
        key, or a pattern with ``*``/``>``); none when the bucket does not exist. One pull
        consumer, as ``Bus.kv_entries`` reads it."""
        stream, prefix = f"KV_{subjects.token(bucket, 'bucket')}", f"$KV.{bucket}."
        created = self._js(f"$JS.API.CONSUMER.CREATE.{stream}", {"stream_name": stream, "config": {
            "deliver_policy": "last_per_subject", "ack_policy": "none",
            "filter_subject": f"{prefix}{keys}", "inactive_threshold": 60_000_000_000,
            "mem_storage": True, "num_replicas": 1}}, bucket, timeout)
        if created is None:
            return []
        consumer, remaining = str(created["name"]), int(created.get("num_pending") or 0)
        live: dict[str, tuple[int, bytes]] = {}
        deliver = f"{self._inbox}_kv.{consumer}"  # outside the replies' ``{inbox}.*``
        sid = self._subscribe(deliver)
        try:
            deadline = time.monotonic() + timeout
            pull = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
            while remaining > 0:
                self._publish(pull, json.dumps(
                    {"batch": min(remaining, KV_BATCH), "no_wait": True}).encode(),
                    deliver, None)
                for _ in range(min(remaining, KV_BATCH)):
                    msg = self._next(f"#{sid}", pull, deadline)
                    if msg is None:
                        raise wire.kv_read_failed(bucket, TimeoutError("no records"))
                    status = (msg.headers or {}).get(wire.STATUS_HEADER)
                    if status is not None:  # 404/408: no more now; anything else: an error
                        if status in ("404", "408"):
                            remaining = 0
                            break
                        raise wire.kv_read_failed(bucket, (msg.headers or {}).get(
                            "Description", status))
                    remaining = _pending(msg.reply)
                    key = msg.subject.removeprefix(prefix)
                    if wire.kv_deleted(msg.headers):  # deleted or expired
                        live.pop(key, None)
                    elif msg.data:
                        live[key] = (_stream_seq(msg.reply), msg.data)
                    if remaining == 0:
                        break
        finally:
            self._unsubscribe(sid)
            try:  # an ephemeral consumer stays until it is deleted or its inactivity ends
                self._js(f"$JS.API.CONSUMER.DELETE.{stream}.{consumer}", {}, bucket, 1.0)
            except PhyError:  # it goes by itself after a minute without reads
                pass
        return [(key, rev, value) for key, (rev, value) in live.items()]

    def _js(self, subject: str, body: dict[str, Any], bucket: str,
            timeout: float) -> dict[str, Any] | None:
        """A JetStream API request; None when the stream does not exist."""
        try:
            msg = self._request(subject, json.dumps(body).encode(), None, timeout)
        except Unavailable as e:  # no responders: JetStream is off or has no leader
            raise wire.kv_read_failed(bucket, e) from None
        if msg is None:
            raise wire.kv_read_failed(bucket, TimeoutError(f"no reply on {subject}"))
        answer: dict[str, Any] = json.loads(msg.data or b"{}")
        error = answer.get("error")
        if error:
            if error.get("err_code") == JS_STREAM_NOT_FOUND:
                return None
            raise wire.kv_read_failed(bucket, error.get("description", error))
        return answer

    # -- the protocol ---------------------------------------------------------------------------

    def _reply_subject(self) -> str:
        self._tokens += 1
        return f"{self._inbox}.{self._tokens}"

    def _subscribe(self, subject: str) -> int:
        self._sids += 1
        self._send(f"SUB {subject} {self._sids}\r\n".encode())
        return self._sids

    def _unsubscribe(self, sid: int) -> None:
        self._mail.pop(f"#{sid}", None)
        try:
            self._send(f"UNSUB {sid}\r\n".encode())
        except Unavailable:
            pass

    def _publish(self, subject: str, payload: bytes, reply: str,
                 headers: dict[str, str] | None) -> None:
        if len(payload) > self.max_payload:
            raise PayloadTooLarge(f"a request of {len(payload)} bytes is over the NATS server's "
                                  f"limit of {self.max_payload} bytes")
        if headers:
            head = encode_headers(headers)
            total = len(head) + len(payload)
            self._send(f"HPUB {subject} {reply} {len(head)} {total}\r\n".encode() + head
                       + payload + CRLF)
        else:
            self._send(f"PUB {subject} {reply} {len(payload)}\r\n".encode() + payload + CRLF)

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise Unavailable(f"lost the connection to NATS at {self.url}: {e}") from None

    def _next(self, key: str, subject: str, deadline: float) -> Msg | None:
        """The next message for ``key`` (a reply subject, or ``#<sid>``), None at the
        deadline; a publish to ``subject`` the server refuses raises ``Forbidden``."""
        box = self._mail.setdefault(key, deque())
        while not box:
            try:
                op = self._read_op(deadline)
            except TimeoutError:
                return None
            if isinstance(op, _Err):
                self._refused(op, subject)
        return box.popleft()

    def _refused(self, err: _Err, subject: str) -> None:
        text = err.text.lower()
        if "permissions violation for publish to" in text:
            if f'"{subject.lower()}"' in text:
                raise wire.refused(subject, self.identity)
            return  # a refusal of an earlier publish (a consumer's delete): not this one's
        raise Unavailable(f"NATS at {self.url} refused: {err.text}")

    def _read_op(self, deadline: float) -> str | _Err:
        """Read the next protocol operation: a message is put in its mailbox (those for no
        one dropped), a PING answered; returns ``"MSG"``, ``"PONG"``... or an ``_Err``."""
        reader = _Reader(self.sock, self._buf)
        while True:
            line = reader.line(deadline)
            op, _, rest = line.partition(b" ")
            if op in (b"MSG", b"HMSG"):
                args = rest.decode().split()
                if op == b"MSG":
                    subject, sid, *reply, size = args
                    data = reader.exact(int(size) + 2, deadline)[:-2]
                    headers = None
                else:
                    subject, sid, *reply, head_len, size = args
                    block = reader.exact(int(size) + 2, deadline)
                    headers = parse_headers(block[:int(head_len)])
                    data = block[int(head_len):-2]
                to = reply[0] if reply else ""
                key = subject if sid == "1" else f"#{sid}"
                box = self._mail.get(key)
                if box is not None:
                    box.append(Msg(subject, to, headers, bytes(data)))
                return "MSG"
            if op == b"PING":
                self._send(b"PONG\r\n")
                continue
            if op == b"-ERR":
                return _Err(rest.decode("utf-8", "replace").strip().strip("'"))
            if op in (b"PONG", b"+OK", b"INFO"):
                if op == b"PONG":
                    return "PONG"
                continue
            raise Unavailable(f"NATS at {self.url} sent what this client does not know: "
                              f"{line[:80]!r}")


@dataclass(frozen=True)
class _Err:
    text: str


class _Reader:
    """Lines and exact byte counts from a socket, with a deadline; ``buf`` keeps what was
    read ahead."""

    def __init__(self, sock: socket.socket, buf: bytearray | None = None) -> None:
        self.sock = sock
        self.buf = bytearray() if buf is None else buf

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(1 << 16)
        except (TimeoutError, BlockingIOError):
            raise TimeoutError from None
        except OSError as e:
            raise Unavailable(f"lost the connection to NATS: {e}") from None
        if not chunk:
            raise Unavailable("NATS closed the connection")
        self.buf += chunk

    def line(self, deadline: float) -> bytes:
        while (end := self.buf.find(CRLF)) < 0:
            self._fill(deadline)
        line = bytes(self.buf[:end])
        del self.buf[:end + 2]
        return line

    def exact(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            self._fill(deadline)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


def _ack_tokens(reply: str) -> list[str]:
    """The tokens of a JetStream delivery's ``$JS.ACK...`` subject, in the v1 layout
    (``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>``)
    whether it came in v1 or in v2 (with domain and account hash after ``ACK``)."""
    tokens = reply.split(".")
    if len(tokens) >= 11:  # v2: $JS.ACK.<domain>.<account hash>.<stream>...
        tokens = tokens[:2] + tokens[4:]
    if len(tokens) < 9 or tokens[:2] != ["$JS", "ACK"]:
        raise Unavailable(f"a KV record came with an unexpected reply subject {reply!r}")
    return tokens


def _pending(reply: str) -> int:
    return int(_ack_tokens(reply)[8])


def _stream_seq(reply: str) -> int:
    return int(_ack_tokens(reply)[5])


def _signed_jwt(creds: str, nonce: str) -> dict[str, str]:
    """The ``jwt`` and ``sig`` of a CONNECT with a JWT credentials file (as nats-py signs
    the server's nonce); like nats-py it needs the ``nkeys`` package."""
    try:
        import nkeys
    except ModuleNotFoundError:
        raise BadRequest(f"PHYLLOME_NATS_CREDS ({creds}) needs the Python package nkeys, which "
                         "Phyllome does not install; use PHYLLOME_NATS_USER and "
                         "PHYLLOME_NATS_PASSWORD (`phyllome up --secure` writes them)") from None
    import base64

    try:
        text = open(creds).read()
    except OSError as e:
        raise BadRequest(f"PHYLLOME_NATS_CREDS: cannot read {creds}: {e.strerror}") from None
    blocks = [b.strip() for b in text.split("------")]
    jwt = next((blocks[i + 1] for i, b in enumerate(blocks[:-1]) if "BEGIN NATS USER JWT" in b),
               "")
    seed = next((blocks[i + 1] for i, b in enumerate(blocks[:-1]) if "BEGIN USER NKEY SEED" in b),
                "")
    if not jwt or not seed:
        raise BadRequest(f"PHYLLOME_NATS_CREDS: {creds} holds no user JWT and seed")
    signed = nkeys.from_seed(seed.encode()).sign(nonce.encode())
    return {"jwt": jwt, "sig": base64.b64encode(signed).decode()}
