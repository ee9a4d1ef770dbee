#!/usr/bin/env python3
"""Asks a node's standard gRPC health service (grpc.health.v1) with the PyPI client
grpcio-health-checking, as a load balancer's probe or grpc_health_probe would.

usage: grpc_health_check.py ADDR CREDS_DIR|- SERVICE
Prints the serving status (SERVING, NOT_SERVING, ...) or `ERROR <grpc code>`.
CREDS_DIR holds ca.pem, cert.pem and key.pem (`cluster tls issue`); `-` connects without TLS.
"""
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main():
    addr, creds, service = sys.argv[1], sys.argv[2], sys.argv[3]
    if creds == "-":
        channel = grpc.insecure_channel(addr)
    else:
        read = lambda name: open(f"{creds}/{name}", "rb").read()
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read("ca.pem"),
            private_key=read("key.pem"),
            certificate_chain=read("cert.pem"),
        )
        # Node certificates name the server `cluster-node`, whatever its address.
        options = [("grpc.ssl_target_name_override", "cluster-node")]
        channel = grpc.secure_channel(addr, credentials, options)
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    except grpc.RpcError as error:
        print(f"ERROR {error.code().name}")


if __name__ == "__main__":
    main()
