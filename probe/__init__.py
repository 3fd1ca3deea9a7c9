"""landscape-probe: loss-landscape and generalization probes for any PyTorch model."""
from probe.errors import DataError, DiskFullError, StoreError, UserError

__all__ = ["UserError", "DataError", "StoreError", "DiskFullError"]
__version__ = "0.1.0"
