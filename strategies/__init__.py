"""Server-side federated strategies (Flower ``Strategy`` subclasses)."""

from strategies.fedsvd import FedSVD

__all__ = ["FedSVD"]
