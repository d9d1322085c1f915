"""Privacy defences as NVFlare filters (job filters and site privacy policies)."""

from .activation_privacy import ActivationClipNoise, clip_per_sample, gaussian_epsilon
from .gradient_protection import GradientProtection, maxnorm_noise, relative_noise
from .hijack_detection import GradientAnomalyDetector
from .level_blocking import BLOCKED_LEVELS_KEY, LevelBlocking
from .quantization import ActivationQuantization

__all__ = [
    "BLOCKED_LEVELS_KEY", "ActivationClipNoise", "ActivationQuantization", "GradientAnomalyDetector",
    "GradientProtection", "LevelBlocking",
    "clip_per_sample", "gaussian_epsilon", "maxnorm_noise", "relative_noise",
]
