"""k2eg: read, write, monitor and snapshot EPICS PVs through Apache Kafka."""
from k2eg.client.errors import OperationError, OperationTimeout
from k2eg.dml import dml

__all__ = ["dml", "OperationError", "OperationTimeout"]
__version__ = "0.4.0"
