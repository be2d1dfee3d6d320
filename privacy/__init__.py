"""Differential privacy for the clients: noise calibration, a cumulative ledger, DP-SGD set-up.

Wraps Opacus; imports nothing from ``server/`` or ``client/``.
"""

import logging


def _import_opacus_leaving_the_root_logger_alone() -> None:
    """Import opacus, then take back the root handler its import adds.

    ``opacus.utils.module_utils`` runs ``logging.basicConfig()`` when imported: left there, its
    handler would print every Flower log line a second time. Importing this package leaves the
    root logger's handlers as they were.
    """
    root = logging.getLogger()
    before = list(root.handlers)
    import opacus  # noqa: F401

    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)


_import_opacus_leaving_the_root_logger_alone()

from privacy.accounting import PrivacyLedger, calibrate_noise  # noqa: E402
from privacy.dp_sgd import (  # noqa: E402
    PrivateTraining,
    empty_batch_step,
    frozen_input_backward,
    make_private,
)

__all__ = ["PrivacyLedger", "calibrate_noise", "PrivateTraining", "empty_batch_step",
           "frozen_input_backward", "make_private"]
