"""Generated gRPC stubs of proto/atman/v1/atman.proto (package ``atman.v1``).

Do not edit the ``atman_pb2*`` files: regenerate them with
``python proto/generate.py`` (a test checks they match the proto).
"""

from . import atman_pb2, atman_pb2_grpc

__all__ = ["atman_pb2", "atman_pb2_grpc"]
