"""Differential privacy for the clients: noise calibration, a cumulative ledger, DP-SGD set-up.

Wraps Opacus; imports nothing from ``server/`` or ``client/``.
"""

import logging

# Importing opacus runs logging.basicConfig(); a root handler present first makes that a no-op,
# so Flower's log lines are not printed twice.
if not logging.getLogger().handlers:
    logging.getLogger().addHandler(logging.NullHandler())

from privacy.accounting import PrivacyLedger, calibrate_noise  # noqa: E402
from privacy.dp_sgd import PrivateTraining, make_private  # noqa: E402

__all__ = ["PrivacyLedger", "calibrate_noise", "PrivateTraining", "make_private"]
