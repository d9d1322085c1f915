"""Privacy defences as NVFlare filters (job filters and site privacy policies)."""

from .activation_privacy import ActivationClipNoise, clip_per_sample, gaussian_epsilon
from .gradient_protection import GradientProtection, maxnorm_noise, relative_noise
from .hijack_detection import GradientAnomalyDetector
from .level_blocking import BLOCKED_LEVELS_KEY, LevelBlocking
from .quantization import ActivationQuantization
from .training_requirements import TrainingRequirements

__all__ = [
    "BLOCKED_LEVELS_KEY", "ActivationClipNoise", "ActivationQuantization", "GradientAnomalyDetector",
    "GradientProtection", "LevelBlocking", "TrainingRequirements",
    "clip_per_sample", "gaussian_epsilon", "maxnorm_noise", "relative_noise",
]
