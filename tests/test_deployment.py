"""The app on a real deployment on loopback: SuperLink with TLS + SuperNode authentication."""

import csv
import json
import stat

import psutil
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key

from common.run_config import override_text
from deploy import certificates
from deploy.local import PRIVACY_STATE_FILE, local_deployment, start_supernodes
from tests.conftest import ROOT

RUN_KEYS = ("model.path", "model.max-length", "data.source", "data.text-column",
            "data.label-column", "data.max-eval-examples", "data.partitioner", "train.batch-size",
            "train.local-steps", "strategy.num-rounds", "lora.r", "lora.alpha", "output.dir")


def test_certificates_cover_the_sans_and_keys_load_as_flower_reads_them(tmp_path):
    certificates.write_all(tmp_path, sans=["my.host", "10.1.2.3"], supernodes=2)
    server = x509.load_pem_x509_certificate((tmp_path / certificates.SERVER_CERT).read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"my.host", "localhost"} <= set(sans.get_values_for_type(x509.DNSName))
    assert {"10.1.2.3", "127.0.0.1"} <= {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    ca = x509.load_pem_x509_certificate((tmp_path / certificates.CA_CERT).read_bytes())
    server.verify_directly_issued_by(ca)
    for i in range(2):
        private, public = certificates.supernode_key_paths(tmp_path, i)
        assert isinstance(load_ssh_private_key(private.read_bytes(), None),
                          ec.EllipticCurvePrivateKey)  # flower-supernode's loader
        assert try_load_public_key(public)  # what `flwr supernode register` reads
        assert private.stat().st_mode & 0o777 == 0o600


def test_force_leaves_every_private_key_owner_only(tmp_path):
    argv = ["--out", str(tmp_path), "--supernodes", "2"]
    certificates.main(argv)
    keys = sorted(tmp_path.glob("*.key"))
    assert [k.name for k in keys] == ["ca.key", "server.key", "supernode-0.key",
                                      "supernode-1.key"]
    old = {k: k.read_bytes() for k in keys}
    for key in keys:
        key.chmod(0o644)
    certificates.main([*argv, "--force"])
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert key.read_bytes() != old[key]  # regenerated
    for key in keys[2:]:
        key.chmod(0o644)
    certificates.main(["--out", str(tmp_path), "--supernodes", "2", "--keys-only", "--force"])
    assert {k.name: stat.S_IMODE(k.stat().st_mode) for k in keys[2:]} == {
        "supernode-0.key": 0o600, "supernode-1.key": 0o600}


def test_tls_deployment_runs_two_rounds_and_rejects_an_unregistered_supernode(
        tiny_run_config, tmp_path):
    # Prepare: CA, server certificate, keys for 3 SuperNodes (only 0 and 1 get registered).
    certs = tmp_path / "certs"
    certificates.write_all(certs, sans=["localhost"], supernodes=3)
    overrides = {k: tiny_run_config[k] for k in RUN_KEYS} | {"output.run-name": "deploy"}
    run_config = override_text(overrides)
    run_dir = tmp_path / "run"

    # Execute
    with local_deployment(run_dir, certs) as deployment:
        names = start_supernodes(deployment, 2, privacy_state=True, wait=False)
        key, _ = certificates.supernode_key_paths(certs, 2)  # never registered
        rogue = deployment.start_supernode("rogue", node_config="partition-id=0 num-partitions=2",
                                           key=key)
        deployment.wait_for_nodes(2, names)
        code = deployment.run_app(ROOT, [run_config], timeout=150)
        rogue_code = rogue.wait(timeout=30)
        assert deployment.online_nodes() == 2
        ours = _process_trees(p.pid for p in deployment.processes.values())

    # Assert: the unregistered key was refused by the SuperLink, the others trained 2 rounds.
    assert rogue_code == 1  # flwr_exit maps Flower exit code 305 to process status 1
    rogue_log = (run_dir / "logs" / "rogue.log").read_text()
    assert "Exit Code: 305" in rogue_log and "Failed to activate SuperNode" in rogue_log
    assert "No SuperNode found with the given public key" in (
        run_dir / "logs" / "superlink.log").read_text()
    assert code == 0, (run_dir / "logs" / "flwr-run.log").read_text()[-3000:]
    rows = list(csv.DictReader((tmp_path / "results" / "deploy" / "metrics.csv").open()))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert all(0 < float(r["epsilon-max"]) <= 6.0 for r in rows[1:])
    for i in range(2):  # each node kept its ledger on disk: 2 rounds of local steps
        state = json.loads((run_dir / f"supernode-{i}" / PRIVACY_STATE_FILE).read_text())
        assert sum(e["steps"] for e in state["history"]) == 2 * overrides["train.local-steps"]
    assert not [p for p in ours if _alive(p)]  # SuperLink, SuperNodes, SuperExecs, apps
    assert not list((run_dir / "pids").iterdir())


def _process_trees(pids) -> list[psutil.Process]:
    procs = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return procs


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
