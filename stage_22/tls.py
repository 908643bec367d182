"""TLS on the client's connection: the server proves who it is, and nobody on the way can read or change a byte.

Up to stage 15 the tunnel connection was plain TCP: anyone on the path (the café's Wi-Fi, the
hosting provider's network) could read every user's bytes, and could see the session id that
lets a client take the tunnel over. The secret itself never crossed the wire (auth.py), but
that was all. Now the connection runs inside TLS, as every real tunnel's does:

- The server presents a certificate for its host name, signed by a certificate authority (CA).
- The client checks both: the signature against the CAs it trusts (the system's, or a file
  given with --ca for a private CA), and that the certificate names the host it dialled. The
  second check matters as much as the first: without it, any site with a valid certificate
  (an attacker's own) could pose as our server.
- There is no switch to turn the checks off: a tunnel that "works" without them encrypts its
  users' bytes to whoever sits in the middle. For a test setup, make a private CA (certs.py).
"""

import ssl

# TLS 1.0 and 1.1 have known weaknesses and are disabled by browsers since 2020.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH: the certificate is
# fine, but for another name (or address) than the one the client dialled.
NAME_MISMATCH = {62, 64}


def server_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """What a server presents: its certificate chain and private key. OSError/SSLError if they can't be loaded."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    context.load_cert_chain(certfile, keyfile)
    return context


def client_context(cafile: str | None = None) -> ssl.SSLContext:
    """What a client trusts: the system's CAs, or only those in `cafile`; host names are always checked."""
    # create_default_context turns on both checks: CERT_REQUIRED and check_hostname.
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = MINIMUM_VERSION
    return context


def load_error(what: str, exc: Exception, *files: str) -> str:
    """A one-line reason why a certificate, key or CA file (one of `files`) could not be used."""
    if isinstance(exc, FileNotFoundError | PermissionError):
        # ssl's errors name no file (their filename is None): find the one that can't be opened.
        name = exc.filename or next((file for file in files if not can_open(file)), " or ".join(files))
        problem = "no such file" if isinstance(exc, FileNotFoundError) else "permission denied for"
        return f"cannot read the {what}: {problem} {name!r}"
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    return f"cannot use the {what}: {reason}"


def can_open(file: str) -> bool:
    """True if `file` can be opened for reading."""
    try:
        with open(file, "rb"):
            return True
    except OSError:
        return False


def verify_error(exc: ssl.SSLCertVerificationError, host: str) -> str:
    """A one-line reason why the client refuses the server's certificate, and what to do about it."""
    detail = exc.verify_message or exc.reason or str(exc)
    if exc.verify_code in NAME_MISMATCH:
        return f"the server's certificate is not valid for {host} ({detail}); connect with a name it holds"
    return f"the server's certificate is not trusted ({detail}); for a private CA, pass --ca FILE"
