"""The server's side of the DP label census (``data.class-prior = "census"``, privacy.census).

Before round 1 the server sends one ``query.census`` message to every connected node, sums the
noisy counts of the nodes that answer (one answer per partition), floors and normalises them
into π̂ and writes π̂ to the results folder (:data:`common.schema.CLASS_PRIOR_FILE`), where a
resumed run reads it back: the nodes, whose ledgers already hold their census, refuse a second.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import contract, schema
from common.config import AppConfig
from privacy.census import CENSUS_ACTION, CENSUS_RECORD, NOISY_COUNTS, census_prior

CENSUS_TIMEOUT = 600.0  # seconds the census waits for the nodes' answers


class CensusFailed(RuntimeError):
    """No node answered the census, or a resumed run lacks the prior of its first census."""


def take_census(grid: Grid, cfg: AppConfig, label_names: Sequence[str], folder: Path,
                timeout: float = CENSUS_TIMEOUT) -> dict[str, float]:
    """π̂ {class name: share > 0} of the nodes' noisy counts; written to ``folder``.

    Waits until ``strategy.min-train-nodes`` nodes are connected, then asks each connected node
    once. With ``output.resume`` the prior of the first attempt is read back instead.
    """
    path = folder / schema.CLASS_PRIOR_FILE
    if cfg.output.resume:
        if not path.is_file():
            raise CensusFailed(f"output.resume=true: {path} is missing, and the nodes answer one "
                               "census per run; start the run afresh (output.overwrite=true)")
        return json.loads(path.read_text(encoding="utf-8"))["shares"]
    while len(nodes := sorted(grid.get_node_ids())) < cfg.strategy.min_train_nodes:
        log(INFO, "census: waiting for nodes to connect: %d connected (minimum required: %d)",
            len(nodes), cfg.strategy.min_train_nodes)
        time.sleep(1)
    messages = [Message(RecordDict({contract.CONFIG: ConfigRecord({})}),
                        message_type=f"{MessageType.QUERY}.{CENSUS_ACTION}", dst_node_id=n)
                for n in nodes]
    answers: dict[int, list[float]] = {}  # partition id -> noisy counts (the first answer)
    refused: list[str] = []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            refused.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
            continue
        partition = int(reply.content.metric_records[contract.METRICS][contract.PARTITION_ID])
        counts = reply.content.config_records[CENSUS_RECORD][NOISY_COUNTS]
        answers.setdefault(partition, [float(c) for c in counts])  # type: ignore[union-attr]
    if refused:
        log(WARNING, "census: %d of %d node(s) sent no counts: %s", len(refused), len(nodes),
            "; ".join(refused))
    if not answers:
        raise CensusFailed(f"no node answered the census ({len(nodes)} asked): there is no "
                           "prior to decide by" + (f" ({refused[0]})" if refused else ""))
    shares = census_prior(list(answers.values()), label_names)
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "shares": shares, "partitions": sorted(answers),
        "noise-multiplier": cfg.privacy.census_noise,
    }, indent=1) + "\n", encoding="utf-8")
    log(INFO, "census: %d partition(s) counted under DP (σ_c = %g per class count), shares %s",
        len(answers), cfg.privacy.census_noise,
        ", ".join(f"{name} {share:.4g}" for name, share in shares.items()))
    return shares
