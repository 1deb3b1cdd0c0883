#!/usr/bin/env python3
"""Reproducer (found by UBSan in the scripts/sanitize.sh tree; fixed by 35039bb,
kept to replay against any server):
an Embed whose raw tensor's shape overflows int64 in Embedder::Prepare's
checks (server/core/embedder.cc: shape[0] * shape[1] > max_image_pixels).

    build-asan/bin/tlserve --backbone=build-asan/tests/fixtures/r18tiny.pt \
        --port=50777 --data_dir=/tmp/d --metrics_port=0 --device=cpu &
    /usr/bin/python3 fuzz/crashes/embed_tensor_shape_overflow/repro.py localhost:50777

Sanitized server: "runtime error: signed integer overflow: 4294967296 *
4294967296 cannot be represented in type 'long'" and it stops. Release server:
the product wraps to 0, so the pixel limit and the data-size check pass with
empty data, and at::empty's own overflow check throws; the client gets
INVALID_ARGUMENT with LibTorch's whole C++ backtrace as the message.
Expected (and since 35039bb what happens): INVALID_ARGUMENT naming the
shape, from the checks themselves.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "client", "python"))
import grpc  # noqa: E402
from tlserve_client import _stubs  # noqa: E402

_stubs.load()
from tlserve.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402

CASES = [
    (inference_pb2.RawTensor.UINT8_HWC, [2**32, 2**32, 3]),  # H*W wraps to 0
    (inference_pb2.RawTensor.FLOAT32_CHW, [3, 2**32, 2**32]),  # H*W wraps to 0
]

stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(sys.argv[1]))
for layout, shape in CASES:
    req = inference_pb2.EmbedRequest()
    req.images.add().tensor.CopyFrom(inference_pb2.RawTensor(layout=layout, shape=shape))
    try:
        stub.Embed(req, timeout=60)
        print(shape, "OK (unexpected)")
    except grpc.RpcError as e:
        print(shape, e.code(), e.details()[:200])
