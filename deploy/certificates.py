"""Write a CA, a SuperLink TLS certificate and SuperNode authentication keys.

Files written to ``--out``::

    ca.crt, ca.key                     self-signed CA (copy ca.crt to every SuperNode machine)
    server.pem, server.key             SuperLink certificate (signed by the CA, SANs from --san)
    supernode-<i>.key, supernode-<i>.pub
                                       SuperNode key pair i: EC P-384 in OpenSSH format, as
                                       ``flower-supernode --auth-supernode-private-key`` and
                                       ``flwr supernode register`` read them

Usage: ``python -m deploy.certificates --out DIR --san localhost,127.0.0.1,my.host
--supernodes 2``. The SuperLink certificate must name (as a SAN) every address clients use to
reach it: SuperNodes, the ``flwr`` CLI and the SuperExec the SuperLink starts on loopback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")  # the SuperLink's own SuperExec uses loopback
CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"


def supernode_key_paths(folder: Path, index: int) -> tuple[Path, Path]:
    """(private key, public key) of SuperNode ``index`` in ``folder``."""
    return folder / f"supernode-{index}.key", folder / f"supernode-{index}.pub"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(entries: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for entry in dict.fromkeys(e.strip() for e in entries if e.strip()):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(entry)))
        except ValueError:
            names.append(x509.DNSName(entry))
    return x509.SubjectAlternativeName(names)


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (0600), new file or overwritten.

    ``os.open``'s mode applies only when it creates the file, so an existing key (``--force``)
    is set to 0600 by ``os.fchmod`` too, before the secret is written into it.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _certificate(subject: x509.Name, issuer: x509.Name, public_key, signer,
                 days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                signer.public_key()), False))


def write_ca_and_server(out: Path, sans: Sequence[str], *, days: int = 365) -> None:
    """A self-signed CA and a SuperLink server certificate for ``sans`` (plus loopback)."""
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("fedsvd-flower CA")
    ca = (_certificate(ca_name, ca_name, ca_key.public_key(), ca_key, days)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    all_sans = [*sans, *DEFAULT_SANS]
    server = (_certificate(_name(all_sans[0]), ca_name, server_key.public_key(), ca_key, days)
              .add_extension(_san(all_sans), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
              .sign(ca_key, hashes.SHA384()))
    _write_private(out / CA_KEY, _pem_key(ca_key))
    (out / CA_CERT).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_private(out / SERVER_KEY, _pem_key(server_key))
    (out / SERVER_CERT).write_bytes(server.public_bytes(serialization.Encoding.PEM))


def write_supernode_key(out: Path, index: int) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format (what Flower's SuperNode authentication reads)."""
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = supernode_key_paths(out, index)
    _write_private(private, key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH)
                       + f" supernode-{index}\n".encode())
    return private, public


def write_all(out: Path, *, sans: Sequence[str], supernodes: int, server: bool = True,
              first_index: int = 0, days: int = 365) -> None:
    """CA + server certificate (unless ``server`` is False) and ``supernodes`` key pairs."""
    if server:
        write_ca_and_server(out, sans, days=days)
    for i in range(first_index, first_index + supernodes):
        write_supernode_key(out, i)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m deploy.certificates", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write into")
    parser.add_argument("--san", default="localhost,127.0.0.1",
                        help="comma-separated DNS names / IP addresses of the SuperLink "
                             "(localhost, 127.0.0.1 and ::1 are always added)")
    parser.add_argument("--supernodes", type=int, default=2, help="SuperNode key pairs to write")
    parser.add_argument("--first-index", type=int, default=0,
                        help="number of the first key pair (supernode-<i>.key)")
    parser.add_argument("--keys-only", action="store_true",
                        help="write SuperNode key pairs only (no CA, no server certificate)")
    parser.add_argument("--days", type=int, default=365, help="certificate validity")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    if args.supernodes < 0 or args.days < 1:
        parser.error("--supernodes must be >= 0 and --days >= 1")
    targets = [] if args.keys_only else [args.out / n for n in (CA_CERT, SERVER_CERT)]
    targets += [supernode_key_paths(args.out, i)[0]
                for i in range(args.first_index, args.first_index + args.supernodes)]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not args.force:
        parser.error(f"refusing to overwrite {', '.join(existing)} (pass --force)")
    write_all(args.out, sans=args.san.split(","), supernodes=args.supernodes,
              server=not args.keys_only, first_index=args.first_index, days=args.days)
    print(f"wrote {'' if args.keys_only else 'CA, server certificate and '}"
          f"{args.supernodes} SuperNode key pair(s) to {args.out}")


if __name__ == "__main__":
    main()
