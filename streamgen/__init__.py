"""streamgen: streaming speech generation with prompt-tuned speech language models."""

from .bundle import Bundle, BundleError, load_bundle
from .models.checkpoints import CheckpointError

__version__ = "0.1.0"
__all__ = ["Bundle", "BundleError", "CheckpointError", "load_bundle", "__version__"]
