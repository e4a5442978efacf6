"""lipmargin: Lipschitz-Margin Training and certification (Tsuzuku et al., NeurIPS 2018)."""

__version__ = "0.1.0"

from .bounds import CertifiedBound, LipschitzBound  # noqa: E402
from .certify import certify, evaluate  # noqa: E402

__all__ = ["CertifiedBound", "LipschitzBound", "__version__", "certify", "evaluate"]
