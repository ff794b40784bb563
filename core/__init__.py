"""batchwire: PyTorch's Dataset + DataLoader split across the network.

``batchwire.server`` serves datasets over gRPC; ``batchwire.client`` consumes
them. Both share ``batchwire.wire`` (batch encoding) and ``batchwire.v1`` (the
generated stubs of ``protos/batchwire/v1/batchwire.proto``).
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
