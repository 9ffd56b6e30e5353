"""Models: the wrapper that owns preprocessing, the network zoo, checkpoints and training."""

from medadv.models.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from medadv.models.wrapper import MedicalClassifier, ModelSpec
from medadv.models.zoo import ARCHITECTURES, build_network

__all__ = ["ARCHITECTURES", "MedicalClassifier", "ModelSpec", "build_network", "load_checkpoint",
           "read_metadata", "save_checkpoint"]
