"""What generated adapters import: every class they subclass, and :class:`ModelCoreMapper`.

A generated adapter (``generated/<name>/__init__.py``) imports this module and nothing else of Resonance, so
library files can move without touching ``generated/``. It is also the one place to import the seed's classes
from by hand: ``from resonance.api import VLProcessor, VLSFTTrainer, ...``.
"""

from resonance.algorithms.dpo import VLDPOTrainer
from resonance.algorithms.grpo import VLGRPOTrainer
from resonance.algorithms.ppo import VLPPOTrainer
from resonance.algorithms.rm import VLRewardTrainer
from resonance.algorithms.sft import VLSFTTrainer
from resonance.base.collator import VLDPODataCollatorWithPadding, VLPromptCollator, VLSFTDataCollatorWithPadding
from resonance.base.model import VLModel
from resonance.base.processor import ImageInput, VideoSupport, VLProcessor
from resonance.base.registry import ModelCoreMapper
from resonance.base.reward import VLRewardDataCollatorWithPadding, VLRewardModel
from resonance.base.value import VLModelWithValueHead

__all__ = [
    "ImageInput",
    "ModelCoreMapper",
    "VLDPODataCollatorWithPadding",
    "VLDPOTrainer",
    "VLGRPOTrainer",
    "VLModel",
    "VLModelWithValueHead",
    "VLPPOTrainer",
    "VLProcessor",
    "VLPromptCollator",
    "VLRewardDataCollatorWithPadding",
    "VLRewardModel",
    "VLRewardTrainer",
    "VLSFTDataCollatorWithPadding",
    "VLSFTTrainer",
    "VideoSupport",
]
