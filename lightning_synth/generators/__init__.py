"""Synthetic-data generators: targeted augmentation, a weakness-conditioned GAN, scenarios."""

from lightning_synth.generators.base import GenerationContext, SyntheticBatch, SyntheticGenerator
from lightning_synth.generators.gan import ConditionalGAN
from lightning_synth.generators.gan_generator import ConditionalGANGenerator
from lightning_synth.generators.scenario import ScenarioGenerator
from lightning_synth.generators.targeted import TargetedAugmentation

__all__ = [
    "ConditionalGAN",
    "ConditionalGANGenerator",
    "GenerationContext",
    "ScenarioGenerator",
    "SyntheticBatch",
    "SyntheticGenerator",
    "TargetedAugmentation",
]
