"""TLS with mutual authentication, as NEO does it.

The TLS handshake comes right after the TCP connection and the NEO
handshake goes inside it.  Both ends present a certificate signed by the
cluster's CA and require one from the peer (no host name check: the CA is
the authentication, as in NEO).  TLS 1.2 is the floor because NEO's nodes
negotiate nothing newer; two neozodb nodes agree on 1.3.  Revocation lists
found in the CA file are honoured for the peer's certificate.

``TLS`` holds a node's two contexts (accepting and connecting) and rebuilds
them from the same files on ``reload()`` (SIGHUP): connections already
established keep the context they were made with, new ones use the new
files.
"""
from __future__ import annotations

import logging
import os
import socket
import ssl
import threading

log = logging.getLogger("neozodb.net")

# The first byte of a TLS record carrying a handshake message (ClientHello)
TLS_HANDSHAKE_RECORD = 0x16


class TLSConfigError(ValueError):
    """The CA, certificate and key files cannot be used together."""


def _context(purpose: int, ca: str, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=ca)
    ctx.load_cert_chain(cert, key)
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if ctx.cert_store_stats()["crl"]:
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def _self_check(server: ssl.SSLContext, client: ssl.SSLContext) -> None:
    """Handshake with ourselves over a socket pair: proves that our own
    certificate is signed by the CA (and not revoked), which loading the
    files alone does not."""
    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def accept() -> None:
        try:
            with server.wrap_socket(b, server_side=True) as s:
                s.recv(1)
        except (ssl.SSLError, OSError) as e:
            errors.append(e)

    a.settimeout(10)
    b.settimeout(10)
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        with client.wrap_socket(a) as s:
            s.sendall(b"\0")
    except (ssl.SSLError, OSError) as e:
        errors.append(e)
    finally:
        t.join(10)
        b.close()
    if errors:
        e = errors[0]
        raise TLSConfigError("certificate not accepted with this CA: %s"
                             % (getattr(e, "verify_message", None) or e))


def load_contexts(ca: str, cert: str, key: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context) from the three PEM files, checked
    to belong together; ``TLSConfigError`` with a one-line reason if not."""
    for what, path in (("CA", ca), ("certificate", cert), ("key", key)):
        if not path:
            raise TLSConfigError("TLS needs the CA, the certificate and the key: %s missing" % what)
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise TLSConfigError("cannot read %s file %s: %s" % (what, path, e.strerror or e)) \
                from None
    try:
        server = _context(ssl.PROTOCOL_TLS_SERVER, ca, cert, key)
        client = _context(ssl.PROTOCOL_TLS_CLIENT, ca, cert, key)
    except ssl.SSLError as e:
        raise TLSConfigError("%s, %s, %s: %s" % (ca, cert, key, e.reason or e)) from None
    except (OSError, ValueError) as e:
        raise TLSConfigError("%s, %s, %s: %s" % (ca, cert, key, e)) from None
    _self_check(server, client)
    return server, client


class TLS:
    """A node's TLS contexts, rebuilt from the same files by ``reload()``."""

    def __init__(self, ca: str, cert: str, key: str) -> None:
        # absolute: a node's working directory does not change what it reloads
        self.files = tuple(os.path.abspath(f) if f else "" for f in (ca, cert, key))
        self.server, self.client = load_contexts(*self.files)

    def reload(self, label: str = "") -> bool:
        """Load the files again (rotated certificates); keep the current
        contexts, and log why, if the new files do not work."""
        try:
            self.server, self.client = load_contexts(*self.files)
        except TLSConfigError as e:
            log.error("%s: TLS files not reloaded, keeping the previous ones: %s", label, e)
            return False
        log.info("%s: TLS certificate files reloaded", label)
        return True

    def warn_if_exposed(self, label: str = "") -> bool:
        """Log a warning when the private key file can be read by others
        than its owner (the key is the node's identity in the cluster)."""
        key = self.files[2]
        try:
            mode = os.stat(key).st_mode
        except OSError:
            return False
        if mode & 0o077:
            log.warning("%s: TLS key %s is readable by others than its owner (mode %o):"
                        " chmod 600 it", label, key, mode & 0o777)
            return True
        return False


def from_options(options: object) -> TLS | None:
    """The TLS of a node from its parsed options (``ca``, ``cert``,
    ``key``), None when none is given; ``TLSConfigError`` when only some
    are, or when they do not work together."""
    files = [getattr(options, k, None) for k in ("ca", "cert", "key")]
    if not any(files):
        return None
    return TLS(*files)  # type: ignore[arg-type]


def tls_from_env(environ: dict | None = None) -> tuple[str, str, str] | None:
    """NEO_CA, NEO_CERT, NEO_KEY from the environment (neos:// URIs)."""
    env = os.environ if environ is None else environ
    files = tuple(env.get(k) or "" for k in ("NEO_CA", "NEO_CERT", "NEO_KEY"))
    return files if any(files) else None  # type: ignore[return-value]


class TLSSocket:
    """The client side of TLS over a blocking socket used by two threads,
    the reader (``recv``) and the writers (``sendall``, holding the
    connection's send lock).  OpenSSL objects must not be used by two
    threads at once, and a reader blocked in a TLS read must not stop the
    writers: so the socket I/O stays plain and only the encryption, done
    in memory (``ssl.MemoryBIO``), is serialised, for microseconds."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=False)
        self._lock = threading.Lock()
        self._carry = b""  # encrypted bytes a non-blocking send left behind
        self._eof = False

    def handshake(self) -> None:
        """The TLS handshake, blocking (the socket's timeout applies)."""
        obj = self._obj
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                out = self._out.read()
                if out:
                    self.sock.sendall(out)
                data = self.sock.recv(1 << 16)
                if not data:
                    raise ConnectionResetError("connection closed during the TLS handshake") from None
                self._in.write(data)
        out = self._out.read()
        if out:
            self.sock.sendall(out)

    def version(self) -> str | None:
        return self._obj.version()

    def _encrypt(self, data: bytes) -> bytes:
        with self._lock:
            if data:
                self._obj.write(data)
            out = self._out.read()
        if self._carry:
            out, self._carry = self._carry + out, b""
        return out

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(self._encrypt(data))

    def send(self, data: bytes, flags: int = 0) -> int:
        """Non-blocking send of a whole message: what the socket does not
        take now leaves first with the next send (an encrypted record
        cannot be taken back).  Returns ``len(data)`` or raises like
        ``socket.send``."""
        out = self._encrypt(data)
        try:
            sent = self.sock.send(out, flags)
        except BlockingIOError:
            sent = 0
        self._carry = out[sent:]
        return len(data)

    def recv(self, size: int) -> bytes:
        """Decrypted bytes, at least one; b"" at the end of the stream.
        Raises what the plain socket's ``recv`` raises (``BlockingIOError``
        when its receive timeout expires)."""
        if self._eof:
            return b""
        obj = self._obj
        while True:
            data = self.sock.recv(size)
            with self._lock:
                if not data:
                    self._in.write_eof()
                else:
                    self._in.write(data)
                chunks = []
                try:
                    # usually one whole record per recv: read it without
                    # the SSLWantReadError a second read would raise
                    while True:
                        chunk = obj.read(size)
                        if not chunk:
                            break
                        chunks.append(chunk)
                        if not self._in.pending and not obj.pending():
                            break
                except ssl.SSLWantReadError:
                    pass
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    self._eof = True
            if chunks:
                return b"".join(chunks)
            if self._eof or not data:
                self._eof = True
                return b""

    # the rest is the plain socket's
    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()

    def setsockopt(self, *args: object) -> None:
        self.sock.setsockopt(*args)  # type: ignore[arg-type]

    def fileno(self) -> int:
        return self.sock.fileno()
