"""Certificates for trying the tunnel on one machine: a private CA, and a server certificate it signed.

    python3 -m stage_22.certs certs/                       # for localhost, 127.0.0.1 and ::1
    python3 -m stage_22.certs certs/ tunnel.example.com '*.tunnel.example.com'   # for HTTPS users too

It writes certs/ca.pem (give it to the client: --ca certs/ca.pem), certs/server.pem and
certs/server.key (give them to the server: --cert, --key). The demo (`python3 -m stage_22`) makes
a fresh set in a temporary folder each time it starts.

A private CA is trusted by nobody but the clients you hand ca.pem to: fine for a workshop, and
for a tunnel whose clients are all yours. A server the public reaches by name gets its
certificate from a public CA instead (Let's Encrypt; the stage page shows how), and its clients
need no --ca at all. The standard library can check certificates but not make them, so this
module runs the `openssl` command, which comes with Linux and macOS.
"""

import argparse
import ipaddress
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# The names a client dials the server by, on one machine. A certificate for `*.localhost` would
# not help HTTPS users of myapp.localhost: OpenSSL (so Python and curl) refuses a wildcard with
# only one label after it. `*.tunnel.example.com` works.
DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")
DAYS = 30  # a test certificate that leaks is useless soon


class CertError(Exception):
    """The certificates could not be made: one line saying why."""


def make(directory: Path, names: tuple[str, ...] = DEFAULT_NAMES) -> tuple[Path, Path, Path]:
    """Write ca.pem, server.pem and server.key into `directory`; return their paths. CertError if openssl fails."""
    if shutil.which("openssl") is None:
        raise CertError("the openssl command is needed to make certificates; install it (e.g. apt install openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    ca, cert, key = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    with tempfile.TemporaryDirectory() as scratch:  # the CA's key is thrown away: it signs this one certificate
        ca_key, request, extensions = (Path(scratch) / name for name in ("ca.key", "server.csr", "server.ext"))
        # The CA: self-signed, allowed to sign certificates and nothing else.
        _openssl(
            "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", ca_key, "-out", ca, "-days", str(DAYS), "-subj", "/CN=ngrok-- private CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        # The server's key and a request for a certificate naming it...
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", key, "-out", request, "-subj", f"/CN={names[0]}",
        )  # fmt: skip
        # ...which the CA signs. Clients check the names in subjectAltName, not the CN.
        extensions.write_text(
            f"subjectAltName={alt_names(names)}\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=serverAuth\n"
            "authorityKeyIdentifier=keyid\n"
        )
        _openssl(
            "x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
            "-CAserial", Path(scratch) / "ca.srl", "-out", cert, "-days", str(DAYS), "-extfile", extensions,
        )  # fmt: skip
    key.chmod(0o600)  # a private key is for the server's eyes only
    return ca, cert, key


def alt_names(names: tuple[str, ...]) -> str:
    """subjectAltName's value: 'DNS:localhost,IP:127.0.0.1,...'."""
    return ",".join(f"{'IP' if is_address(name) else 'DNS'}:{name}" for name in names)


def is_address(name: str) -> bool:
    """True for an IP address (it goes in the certificate as IP:, not DNS:)."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _openssl(*args: str | Path) -> None:
    done = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise CertError(f"openssl {args[0]} failed: {last}")


def main() -> None:
    """Command line: python3 -m stage_22.certs DIR [NAME ...]."""
    parser = argparse.ArgumentParser(
        prog=f"python3 -m {__package__}.certs",
        description="Make a private CA and a server certificate (with openssl) for trying the tunnel.",
    )
    parser.add_argument("directory", type=Path, metavar="DIR", help="where to write ca.pem, server.pem, server.key")
    parser.add_argument(
        "names",
        nargs="*",
        default=DEFAULT_NAMES,
        metavar="NAME",
        help=f"host names and addresses the certificate holds (default: {' '.join(DEFAULT_NAMES)})",
    )
    args = parser.parse_args()
    try:
        ca, cert, key = make(args.directory, tuple(args.names))
    except (CertError, OSError) as exc:
        sys.exit(f"error: {exc}")
    print(f"server: --cert {cert} --key {key}\nclient: --ca {ca}")


if __name__ == "__main__":
    main()
