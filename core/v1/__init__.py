"""Generated gRPC stubs of protos/batchwire/v1/batchwire.proto (do not edit)."""
