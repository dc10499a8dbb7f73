"""Code generated from ``proto/sidecar/v1/discovery.proto`` by ``python -m sidecar.grpc_gen.regenerate``.

Do not edit the ``*_pb2*`` files by hand: change the proto and regenerate.
"""
