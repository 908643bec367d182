"""Test certificates, made at run time with trustme: a private CA and the certificates it signs.

Nothing here is committed to the repository: the keys are made fresh in every test session, in a
temporary folder that is removed when the session ends.

- `certs()`: the test CA and the server certificate it signs (`SERVER_NAMES`), as files, for the
  command lines (`--cert`, `--key`, `--ca`) and for curl (`--cacert`).
- `server_context()` / `client_context()`: ready `ssl.SSLContext`s for the in-process tests; the
  client trusts only the test CA and checks host names, as the stage's own `tls.client_context` does.
- `wrong_ca()`: an unrelated CA, for the client that must not trust our server.
- `other_host()`: a certificate from the test CA that names only `OTHER_HOST`, for the client that
  must refuse a server whose certificate is for another host.
"""

import atexit
import functools
import shutil
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import trustme

# Every name a test reaches the server by. The HTTPS tests use DOMAIN: OpenSSL (and so Python and
# curl) won't match a wildcard with only one label after it, so `*.localhost` never covers
# `myapp.localhost`; `*.tunnel.test` does cover `myapp.tunnel.test` (.test is reserved, RFC 2606).
DOMAIN = "tunnel.test"
# The labs' servers are reached by address, in their network namespaces: link_lab.SERVER_IP.
LAB_SERVER_IPS = ("198.51.100.1",)
SERVER_NAMES = ("localhost", "*.localhost", f"*.{DOMAIN}", "127.0.0.1", "::1", *LAB_SERVER_IPS)
# A host the server certificate of `other_host()` names instead of ours.
OTHER_HOST = "not-this-server.example"


@dataclass(frozen=True)
class CertFiles:
    """A CA's certificate, and a certificate it signed with its private key, as PEM files."""

    ca: Path  # ca.pem: what a client trusts (--ca, curl's --cacert)
    cert: Path  # server.pem: the certificate chain the server presents (--cert)
    key: Path  # server.key: its private key (--key)

    def server_context(self) -> ssl.SSLContext:
        """A server's context presenting this certificate (TLS 1.2 or later)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client's context that trusts only this CA, and checks the host name."""
        context = ssl.create_default_context(cafile=str(self.ca))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


@functools.cache
def _folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="tunnel-test-certs-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _write(ca: trustme.CA, names: tuple[str, ...], prefix: str) -> CertFiles:
    folder = _folder()
    files = CertFiles(folder / f"{prefix}ca.pem", folder / f"{prefix}server.pem", folder / f"{prefix}server.key")
    issued = ca.issue_cert(*names)
    ca.cert_pem.write_to_path(str(files.ca))
    with files.cert.open("wb") as chain:  # the leaf first, then what signed it (here: just the CA)
        for pem in issued.cert_chain_pems:
            chain.write(pem.bytes())
    files.key.touch(mode=0o600)  # readable by its owner only, as a real key would be
    issued.private_key_pem.write_to_path(str(files.key))
    return files


@functools.cache
def _test_ca() -> trustme.CA:
    return trustme.CA(organization_name="ngrok-- tests")


@functools.cache
def certs() -> CertFiles:
    """The session's test CA and its certificate for SERVER_NAMES."""
    return _write(_test_ca(), SERVER_NAMES, "")


@functools.cache
def wrong_ca() -> CertFiles:
    """Another CA, unrelated to ours, and a certificate it signed for the same names."""
    return _write(trustme.CA(organization_name="not the ngrok-- tests"), SERVER_NAMES, "wrong-")


@functools.cache
def other_host() -> CertFiles:
    """A certificate signed by the test CA that names only OTHER_HOST (not localhost, not 127.0.0.1)."""
    return _write(_test_ca(), (OTHER_HOST,), "other-")


def server_context() -> ssl.SSLContext:
    """The server side of the test certificate: what the control port (and an HTTPS public port) presents."""
    return certs().server_context()


def client_context() -> ssl.SSLContext:
    """A client that trusts only the test CA and checks host names."""
    return certs().client_context()


if __name__ == "__main__":  # a quick look: python tests/tls_certs.py
    for files in (certs(), wrong_ca(), other_host()):
        print(files)
        files.server_context()
        files.client_context()
