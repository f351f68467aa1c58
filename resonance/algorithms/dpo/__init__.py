"""DPO: TRL's DPOTrainer with one vision pass per batch and each pair over a single copy of its prompt."""

from resonance.algorithms.dpo.config import VLDPOConfig
from resonance.algorithms.dpo.trainer import VLDPOTrainer

__all__ = ["VLDPOConfig", "VLDPOTrainer"]
