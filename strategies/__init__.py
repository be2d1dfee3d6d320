"""Server-side federated strategies: one :class:`LoraStrategy` subclass per method."""

from strategies.base import LoraStrategy
from strategies.fedavg_lora import FedAvgLoRA
from strategies.fedex import FedExLoRA
from strategies.fedsvd import FedSVD
from strategies.ffa import FFALoRA
from strategies.flora import FLoRA
from strategies.merge_sv import MergeSV
from strategies.rolora import RoLoRA

__all__ = ["FFALoRA", "FLoRA", "FedAvgLoRA", "FedExLoRA", "FedSVD", "LoraStrategy", "MergeSV",
           "RoLoRA"]
