"""Starting a local deployment again on its run dir: what it reuses, and when it refuses.

``deploy.local`` on a run dir it has used before reuses the certificates, the SuperLink's
database (with the SuperNode keys registered in it) and each SuperNode's ``FLWR_HOME`` (with its
privacy ledger). It cannot when a deployment there is still running, or when the certificates do
not fit together: :func:`reuse_refusal` says why, before anything starts.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from deploy import certificates as certs_mod
from deploy.processes import live_pid_files


def reuse_refusal(run_dir: Path, certs: Path | None, supernodes: int) -> str | None:
    """Why the deployment in ``run_dir`` cannot be started (again) now, or None.

    A deployment there that is still running (PID files of live Flower processes; a file whose
    process ended, or whose PID now names another program, is ignored), or ``certs`` that do
    not fit together
    (:func:`certificate_problems`).
    """
    if running := live_pid_files(run_dir):
        listed = ", ".join(f"{name} (PID {pid})" for name, pid in sorted(running.items()))
        return (f"{run_dir} holds a deployment that is still running: {listed}; stop it with "
                f"python -m deploy.local --stop --run-dir {run_dir}")
    if certs is not None and (problems := certificate_problems(certs, supernodes)):
        return (f"the certificates in {certs} cannot be used: {'; '.join(problems)}; write what "
                f"is missing with python -m deploy.certificates --out {certs} (--keys-only "
                "--first-index <i> for SuperNode keys, --force to replace everything), or give "
                "--certs another folder")
    return None


def certificate_problems(certs: Path, supernodes: int) -> list[str]:
    """What keeps ``certs`` from serving ``supernodes`` SuperNodes; [] when nothing does.

    The CA and server files must exist, the server certificate must be issued by the CA and
    match its key, and each SuperNode i < ``supernodes`` needs a key pair whose halves match.
    """
    names = (certs_mod.CA_CERT, certs_mod.SERVER_CERT, certs_mod.SERVER_KEY)
    if missing := [n for n in names if not (certs / n).is_file()]:
        return [f"{', '.join(missing)} missing"]
    problems = _server_problems(certs)
    for i in range(supernodes):
        problems += _key_pair_problems(*certs_mod.supernode_key_paths(certs, i))
    return problems


def _public_bytes(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _server_problems(certs: Path) -> list[str]:
    """The server certificate against the CA and the server key."""
    try:
        ca = x509.load_pem_x509_certificate((certs / certs_mod.CA_CERT).read_bytes())
        server = x509.load_pem_x509_certificate((certs / certs_mod.SERVER_CERT).read_bytes())
        key = serialization.load_pem_private_key((certs / certs_mod.SERVER_KEY).read_bytes(),
                                                 None)
    except ValueError as exc:
        return [f"a certificate or key does not load ({exc})"]
    problems = []
    try:
        server.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        problems.append(f"{certs_mod.SERVER_CERT} was not issued by {certs_mod.CA_CERT}")
    if _public_bytes(server.public_key()) != _public_bytes(key.public_key()):
        problems.append(f"{certs_mod.SERVER_KEY} is not the key of {certs_mod.SERVER_CERT}")
    return problems


def _key_pair_problems(private: Path, public: Path) -> list[str]:
    """A SuperNode's OpenSSH key pair: both halves present, loadable and matching."""
    if not (private.is_file() and public.is_file()):
        return [f"{private.name} or {public.name} missing (a key pair per SuperNode)"]
    try:
        key = serialization.load_ssh_private_key(private.read_bytes(), None)
        pub = serialization.load_ssh_public_key(public.read_bytes())
    except (ValueError, TypeError) as exc:
        return [f"{private.name} / {public.name} do not load ({exc})"]
    if _public_bytes(key.public_key()) != _public_bytes(pub):
        return [f"{public.name} is not the public half of {private.name}"]
    return []
