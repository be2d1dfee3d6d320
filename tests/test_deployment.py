"""The app on a real deployment on loopback: SuperLink with TLS + SuperNode authentication."""

import csv
import json
import stat
import subprocess
import sys

import psutil
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key

from client import ledger
from client.ledger import NODE_LEDGER_FILE
from common.run_config import override_text
from deploy import certificates, local
from deploy.local import local_deployment, main, start_supernodes
from deploy.processes import process_trees, stop_from_pid_files
from deploy.reuse import reuse_refusal
from tests.conftest import ROOT
from tests.helpers import alive

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


def test_tls_deployment_runs_again_on_its_run_dir_and_each_node_counts_both_runs(
        tiny_run_config, tmp_path, capsys):
    # Prepare: CA, server certificate, keys for 3 SuperNodes (only 0 and 1 get registered).
    certs = tmp_path / "certs"
    certificates.write_all(certs, sans=["localhost"], supernodes=3)
    overrides = {k: tiny_run_config[k] for k in RUN_KEYS} | {"output.run-name": "first",
                                                             "strategy.num-rounds": 1}
    run_dir = tmp_path / "run"

    # Execute: a 1-round run (ε = 6) through the API, with a rogue SuperNode
    with local_deployment(run_dir, certs) as deployment:
        names = start_supernodes(deployment, 2, wait=False)
        key, _ = certificates.supernode_key_paths(certs, 2)  # never registered
        rogue = deployment.start_supernode("rogue", node_config="partition-id=0 num-partitions=2",
                                           key=key)
        deployment.wait_for_nodes(2, names)
        code = deployment.run_app(ROOT, [override_text(overrides)], timeout=150)
        rogue_code = rogue.wait(timeout=30)
        assert deployment.online_nodes() == 2
        ours = process_trees(p.pid for p in deployment.processes.values())
    superlink_log = (run_dir / "logs" / "superlink.log").read_text()  # the next one replaces it
    ledgers = [run_dir / f"supernode-{i}" / NODE_LEDGER_FILE for i in range(2)]
    after_first = [json.loads(path.read_text()) for path in ledgers]
    # ... then fedsvd-deploy on the same run dir: its certificates, database and keys again
    capsys.readouterr()
    second = main(["--run-dir", str(run_dir), "--certs", str(certs), "--supernodes", "2",
                   "--timeout", "150", "--run-config",
                   override_text(overrides | {"output.run-name": "second"})])
    out = capsys.readouterr().out.strip().splitlines()

    # Assert: the unregistered key was refused by the SuperLink, the others trained 1 round.
    assert rogue_code == 1  # flwr_exit maps Flower exit code 305 to process status 1
    rogue_log = (run_dir / "logs" / "rogue.log").read_text()
    assert "Exit Code: 305" in rogue_log and "Failed to activate SuperNode" in rogue_log
    assert "No SuperNode found with the given public key" in superlink_log
    assert code == 0, (run_dir / "logs" / "flwr-run.log").read_text()[-3000:]
    rows = list(csv.DictReader((tmp_path / "results" / "first" / "metrics.csv").open()))
    assert [int(r["round"]) for r in rows] == [0, 1]
    assert 6.0 - 0.01 <= float(rows[1]["epsilon-max"]) <= 6.0
    # each SuperNode, with no privacy node config, kept its ledger in its own FLWR_HOME: the
    # ClientApp took itself for a SuperNode and the FLWR_HOME reached it
    for state in after_first:
        assert sum(e["steps"] for e in state["history"]) == overrides["train.local-steps"]
    # the second run started (keys already registered were left as they were), and the nodes,
    # whose ledgers hold the first run's ε ≈ 6, refused to train: the run failed, said last
    assert second not in (0, 2), "\n".join(out[-20:])
    assert "[run] FAILED" in "\n".join(out) and "spent its budget" in out[-1], out[-5:]
    assert [json.loads(path.read_text()) for path in ledgers] == after_first
    assert not [p for p in ours if alive(p)]  # SuperLink, SuperNodes, SuperExecs, apps
    assert not list((run_dir / "pids").iterdir())
    assert not _flower_processes_under(run_dir)


def test_the_launcher_names_the_node_config_key_the_clientapp_reads():
    assert local.PER_RUN_BUDGET_KEY == ledger.PER_RUN_BUDGET_KEY


def test_a_run_dir_whose_deployment_still_runs_is_refused_up_front(tmp_path, capsys):
    (tmp_path / "pids").mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                              "flower-superlink"])
    try:
        (tmp_path / "pids" / "superlink.pid").write_text(f"{alive.pid}\n")
        (tmp_path / "pids" / "supernode-0.pid").write_text("999999999\n")  # long gone
        assert _start_again(tmp_path, "--insecure") == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"holds a deployment that is still running: superlink (PID {alive.pid})" in last
        assert f"python -m deploy.local --stop --run-dir {tmp_path}" in last
        assert not (tmp_path / "pids" / "supernode-0.pid").exists()  # a stale file is cleared
    finally:
        alive.kill()
        alive.wait()
    assert reuse_refusal(tmp_path, None, 2) is None  # ended: reusable


def test_certificates_that_do_not_fit_together_are_refused_up_front(tmp_path, capsys):
    certs, other = tmp_path / "certs", tmp_path / "other"
    certificates.write_all(certs, sans=["localhost"], supernodes=2)
    certificates.write_all(other, sans=["localhost"], supernodes=1)
    assert reuse_refusal(tmp_path, certs, 2) is None
    assert "supernode-2.key or supernode-2.pub missing" in reuse_refusal(tmp_path, certs, 3)
    (certs / "supernode-1.pub").write_bytes((other / "supernode-0.pub").read_bytes())
    assert "supernode-1.pub is not the public half of supernode-1.key" in reuse_refusal(
        tmp_path, certs, 2)
    (certs / "ca.crt").write_bytes((other / "ca.crt").read_bytes())
    assert _start_again(tmp_path / "run", "--certs", str(certs)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "server.pem was not issued by ca.crt" in last and "--keys-only" in last


def _start_again(run_dir, *args: str) -> int:
    """``main()`` on ``run_dir`` (``--keep-running``: no preflight); stopped whatever happens."""
    try:
        return main(["--run-dir", str(run_dir), "--keep-running", *args])
    finally:
        stop_from_pid_files(run_dir)


def _flower_processes_under(run_dir) -> list[psutil.Process]:
    """Flower processes still running whose FLWR_HOME lies in ``run_dir``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if str(run_dir) in proc.environ().get("FLWR_HOME", ""):
                found.append(proc)
        except psutil.Error:
            pass
    return [p for p in found if alive(p)]


