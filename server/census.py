"""The server's side of the DP label census (``data.class-prior = "census"``, privacy.census).

Before round 1 the server sends one ``query.census`` message to every connected node, sums the
noisy counts of the nodes that answer (one answer per partition), floors and normalises them
into π̂ and writes π̂ to the results folder (:data:`common.schema.CLASS_PRIOR_FILE`), where a
resumed run reads it back: the nodes, whose ledgers already hold their census, refuse a second.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import contract, schema
from common.config import StrategyConfig
from privacy.census import CENSUS_ACTION, CENSUS_RECORD, NOISY_COUNTS, census_prior
from strategies.sampling import log_late, split_late, wait_for_nodes, with_ttl


class CensusFailed(RuntimeError):
    """Too few nodes to ask or none answered, or a resumed run lacks its first census's prior."""


def take_census(grid: Grid, strategy: StrategyConfig, label_names: Sequence[str], folder: Path,
                *, resume: bool, noise_multiplier: float) -> dict[str, float]:
    """π̂ {class name: share > 0} of the nodes' noisy counts; written to ``folder``.

    Waits until ``strategy.min-train-nodes`` nodes are connected (fails when fewer connect
    within ``strategy.round-timeout``), then asks each connected node once and waits as long
    for the answers. With ``resume`` (``output.resume``) the prior of the first attempt is read
    back instead. ``noise_multiplier``: the σ_c the nodes add (``PrivacyConfig.census_noise``),
    written beside the shares and logged.
    """
    path = folder / schema.CLASS_PRIOR_FILE
    if resume:
        if not path.is_file():
            raise CensusFailed(f"output.resume=true: {path} is missing, and the nodes answer one "
                               "census per run; start the run afresh (output.overwrite=true)")
        return json.loads(path.read_text(encoding="utf-8"))["shares"]
    timeout, needed = strategy.round_timeout, strategy.min_train_nodes
    nodes = sorted(wait_for_nodes(grid, needed, timeout, what="census"))
    if len(nodes) < needed:
        raise CensusFailed(f"{len(nodes)} node(s) connected within strategy.round-timeout="
                           f"{timeout:g} s, strategy.min-train-nodes={needed} needed for the "
                           "census: start the SuperNodes, or raise strategy.round-timeout")
    messages = with_ttl([Message(RecordDict({contract.CONFIG: ConfigRecord({})}),
                                 message_type=f"{MessageType.QUERY}.{CENSUS_ACTION}",
                                 dst_node_id=n) for n in nodes], timeout)
    late, replies = split_late(messages, list(grid.send_and_receive(messages, timeout=timeout)))
    log_late("census", late, timeout)
    answers: dict[int, list[float]] = {}  # partition id -> noisy counts (the first answer)
    refused: list[str] = []
    for reply in replies:
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
        why = refused[0] if refused else f"no answer within strategy.round-timeout={timeout:g} s"
        raise CensusFailed(f"no node answered the census ({len(nodes)} asked): there is no "
                           f"prior to decide by ({why})")
    shares = census_prior(list(answers.values()), label_names)
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "shares": shares, "partitions": sorted(answers),
        "noise-multiplier": noise_multiplier,
    }, indent=1) + "\n", encoding="utf-8")
    log(INFO, "census: %d partition(s) counted under DP (σ_c = %g per class count), shares %s",
        len(answers), noise_multiplier,
        ", ".join(f"{name} {share:.4g}" for name, share in shares.items()))
    return shares
