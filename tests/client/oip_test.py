#!/usr/bin/env python3
"""The Open Inference Protocol (KServe v2) against a live server, through a
client generated at run time with Debian's python3-grpc-tools from the
protocol's messages as its specification defines them (below: package
`inference`, the specification's names and field numbers; not tlserve's
proto/, so that a wrong field number on the server's side fails here).

Every RPC is called; ModelInfer with BYTES images equals the native Classify
(to 1e-6) and, on "_backbone", Embed; UINT8 pixels and FP32 tensors equal
Embed on the same image or tensor; in `contents` and in raw_input_contents;
bad requests get the right status codes; API keys and tenants apply; the
calls are counted under their own `method` label.

usage: oip_test.py BIN_DIR FIXTURES_DIR
"""
import hashlib
import io
import json
import os
import shutil
import struct
import sys
import tempfile
import unittest
import urllib.request

import grpc
import numpy as np
from grpc_tools import protoc
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "client", "python"))
from tlserve_client import Client  # noqa: E402
from tlserve_client.local_server import LocalServer  # noqa: E402
from tlserve_client import inference_pb2 as native  # noqa: E402
from tlserve.v1 import evaluation_pb2  # noqa: E402

BIN, FIX = sys.argv[1], sys.argv[2]
DEVICE_FLAGS = ["--device=" + (os.environ.get("TLSERVE_TEST_DEVICE") or "cpu")]

# The specification's gRPC messages (kserve/open-inference-protocol,
# specification/protocol/inference_grpc.md), transcribed without comments.
SPEC = """
syntax = "proto3";
package inference;
service GRPCInferenceService {
  rpc ServerLive(ServerLiveRequest) returns (ServerLiveResponse) {}
  rpc ServerReady(ServerReadyRequest) returns (ServerReadyResponse) {}
  rpc ModelReady(ModelReadyRequest) returns (ModelReadyResponse) {}
  rpc ServerMetadata(ServerMetadataRequest) returns (ServerMetadataResponse) {}
  rpc ModelMetadata(ModelMetadataRequest) returns (ModelMetadataResponse) {}
  rpc ModelInfer(ModelInferRequest) returns (ModelInferResponse) {}
}
message ServerLiveRequest {}
message ServerLiveResponse { bool live = 1; }
message ServerReadyRequest {}
message ServerReadyResponse { bool ready = 1; }
message ModelReadyRequest { string name = 1; string version = 2; }
message ModelReadyResponse { bool ready = 1; }
message ServerMetadataRequest {}
message ServerMetadataResponse { string name = 1; string version = 2; repeated string extensions = 3; }
message ModelMetadataRequest { string name = 1; string version = 2; }
message ModelMetadataResponse {
  message TensorMetadata { string name = 1; string datatype = 2; repeated int64 shape = 3; }
  string name = 1; repeated string versions = 2; string platform = 3;
  repeated TensorMetadata inputs = 4; repeated TensorMetadata outputs = 5;
}
message ModelInferRequest {
  message InferInputTensor {
    string name = 1; string datatype = 2; repeated int64 shape = 3;
    map<string, InferParameter> parameters = 4; InferTensorContents contents = 5;
  }
  message InferRequestedOutputTensor { string name = 1; map<string, InferParameter> parameters = 2; }
  string model_name = 1; string model_version = 2; string id = 3;
  map<string, InferParameter> parameters = 4; repeated InferInputTensor inputs = 5;
  repeated InferRequestedOutputTensor outputs = 6; repeated bytes raw_input_contents = 7;
}
message ModelInferResponse {
  message InferOutputTensor {
    string name = 1; string datatype = 2; repeated int64 shape = 3;
    map<string, InferParameter> parameters = 4; InferTensorContents contents = 5;
  }
  string model_name = 1; string model_version = 2; string id = 3;
  map<string, InferParameter> parameters = 4; repeated InferOutputTensor outputs = 5;
  repeated bytes raw_output_contents = 6;
}
message InferParameter {
  oneof parameter_choice {
    bool bool_param = 1; int64 int64_param = 2; string string_param = 3;
    double double_param = 4; uint64 uint64_param = 5;
  }
}
message InferTensorContents {
  repeated bool bool_contents = 1; repeated int32 int_contents = 2; repeated int64 int64_contents = 3;
  repeated uint32 uint_contents = 4; repeated uint64 uint64_contents = 5;
  repeated float fp32_contents = 6; repeated double fp64_contents = 7; repeated bytes bytes_contents = 8;
}
"""

STUBS = tempfile.mkdtemp(prefix="tlserve-oip-stubs-")
with open(os.path.join(STUBS, "grpc_predict_v2.proto"), "w") as f:
    f.write(SPEC)
assert protoc.main(["protoc", "-I" + STUBS, "--python_out=" + STUBS, "--grpc_python_out=" + STUBS,
                    os.path.join(STUBS, "grpc_predict_v2.proto")]) == 0
sys.path.insert(0, STUBS)
import grpc_predict_v2_pb2 as pb  # noqa: E402
import grpc_predict_v2_pb2_grpc as pb_grpc  # noqa: E402

KEYS = {"acme": "acme-oip-key-0123456789", "globex": "globex-oip-key-0123456789"}


def files(split, n_per_class):
    out = []
    root = os.path.join(FIX, "fmnist", split)
    for label in sorted(os.listdir(root)):
        for name in sorted(os.listdir(os.path.join(root, label)))[:n_per_class]:
            with open(os.path.join(root, label, name), "rb") as f:
                out.append((label, name, f.read()))
    return out


def raw_bytes(items):
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def split_raw_bytes(raw):
    out, at = [], 0
    while at < len(raw):
        (n,) = struct.unpack_from("<I", raw, at)
        out.append(raw[at + 4:at + 4 + n])
        at += 4 + n
    return out


def images_input(items, raw=False, shape=None):
    t = pb.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES",
                                              shape=shape or [len(items)])
    if not raw:
        t.contents.bytes_contents.extend(items)
    return t


def outputs_of(resp):
    """name -> numpy array (FP32) or list of bytes (BYTES), from contents or raw."""
    out = {}
    for i, o in enumerate(resp.outputs):
        if resp.raw_output_contents:
            raw = resp.raw_output_contents[i]
            v = (np.frombuffer(raw, dtype="<f4") if o.datatype == "FP32" else split_raw_bytes(raw))
        else:
            v = (np.asarray(o.contents.fp32_contents, dtype=np.float32) if o.datatype == "FP32"
                 else list(o.contents.bytes_contents))
        if o.datatype == "FP32":
            v = v.reshape(list(o.shape))
        out[o.name] = v
    return out


class OipTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="tlserve-oip-")
        keys = os.path.join(cls.tmp, "api_keys")
        with open(keys, "w") as f:
            for tenant, key in KEYS.items():
                f.write("%s write %s %s\n" % (tenant, hashlib.sha256(key.encode()).hexdigest(), tenant))
        cls.server = LocalServer(BIN, os.path.join(FIX, "r18small.pt"), os.path.join(cls.tmp, "data"),
                                 extra_flags=DEVICE_FLAGS + ["--api_keys=" + keys,
                                                             "--max_images_per_request=16"]).start()
        cls.native = Client(cls.server.target, token=KEYS["acme"])
        cls.channel = grpc.insecure_channel(cls.server.target)
        cls.stub = pb_grpc.GRPCInferenceServiceStub(cls.channel)
        cls.native.upload("oip", files("train", 12))
        cls.native.create_model("shoes", dataset="oip")
        job = cls.native.train("shoes", "oip")
        if job.state != 3:  # SUCCEEDED
            raise AssertionError("training failed: %s" % job)
        cls.native.create_model("untrained", dataset="oip")
        cls.classes = list(cls.native.models.GetModel(
            __import__("tlserve_client").models_pb2.GetModelRequest(name="shoes")).classes)
        cls.test = [b for _, _, b in files("test", 3)]

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        cls.native.close()
        cls.server.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)
        shutil.rmtree(STUBS, ignore_errors=True)

    def call(self, method, request, tenant="acme"):
        md = [("authorization", "Bearer " + KEYS[tenant])] if tenant else []
        return getattr(self.stub, method)(request, metadata=md, timeout=120)

    def code(self, method, request, tenant="acme"):
        with self.assertRaises(grpc.RpcError) as e:
            self.call(method, request, tenant)
        return e.exception.code(), e.exception.details()

    def infer(self, model="shoes", inputs=(), raw=(), **kw):
        return pb.ModelInferRequest(model_name=model, inputs=list(inputs), raw_input_contents=list(raw), **kw)

    # --- health and metadata ------------------------------------------------
    def test_health_and_server_metadata(self):
        self.assertTrue(self.call("ServerLive", pb.ServerLiveRequest()).live)
        self.assertTrue(self.call("ServerReady", pb.ServerReadyRequest()).ready)
        m = self.call("ServerMetadata", pb.ServerMetadataRequest())
        self.assertEqual(m.name, "tlserve")
        self.assertRegex(m.version, r"^\d+\.\d+\.\d+$")
        self.assertIn("training", m.extensions)
        self.assertTrue(self.call("ModelReady", pb.ModelReadyRequest(name="shoes")).ready)
        self.assertTrue(self.call("ModelReady", pb.ModelReadyRequest(name="shoes", version="1")).ready)
        self.assertTrue(self.call("ModelReady", pb.ModelReadyRequest(name="_backbone")).ready)
        self.assertFalse(self.call("ModelReady", pb.ModelReadyRequest(name="untrained")).ready)
        self.assertEqual(self.code("ModelReady", pb.ModelReadyRequest(name="nope"))[0],
                         grpc.StatusCode.NOT_FOUND)
        self.assertEqual(self.code("ModelReady", pb.ModelReadyRequest(name="shoes", version="7"))[0],
                         grpc.StatusCode.NOT_FOUND)

    def test_model_metadata(self):
        m = self.call("ModelMetadata", pb.ModelMetadataRequest(name="shoes"))
        self.assertEqual(list(m.versions), ["1"])
        self.assertEqual(m.platform, "pytorch_torchscript")
        self.assertEqual({(t.name, t.datatype) for t in m.inputs},
                         {("images", "BYTES"), ("pixels", "UINT8"), ("tensor", "FP32")})
        outs = {t.name: (t.datatype, list(t.shape)) for t in m.outputs}
        self.assertEqual(outs["probabilities"], ("FP32", [-1, len(self.classes)]))
        self.assertEqual(outs["labels"][0], "BYTES")
        b = self.call("ModelMetadata", pb.ModelMetadataRequest(name="_backbone"))
        dim = self.native.describe_backbone().embedding_dim
        self.assertEqual([(t.name, t.datatype, list(t.shape)) for t in b.outputs],
                         [("embedding", "FP32", [-1, dim])])
        # The class names ride in a field the specification lacks (parameters,
        # 6): present on the wire, kept by this client as an unknown field.
        self.assertIn(json.dumps(self.classes, separators=(",", ":")).encode(), m.SerializeToString())

    # --- inference ----------------------------------------------------------
    def test_bytes_images_equal_classify_in_contents_and_raw(self):
        native_top = self.native.classify("shoes", self.test, top_k=len(self.classes))
        want = np.array([[dict(t)[c] for c in self.classes] for t in native_top], np.float32)
        for raw in (False, True):
            req = self.infer(inputs=[images_input(self.test, raw)],
                             raw=[raw_bytes(self.test)] if raw else [], id="req-%d" % raw)
            r = self.call("ModelInfer", req)
            self.assertEqual((r.model_name, r.model_version, r.id), ("shoes", "1", "req-%d" % raw))
            self.assertEqual(bool(r.raw_output_contents), raw)
            out = outputs_of(r)
            self.assertEqual(out["probabilities"].shape, want.shape)
            np.testing.assert_allclose(out["probabilities"], want, rtol=0, atol=1e-6)
            self.assertEqual([l.decode() for l in out["labels"]], [t[0][0] for t in native_top])
            self.assertEqual([l.decode() for l in out["label"]], [t[0][0] for t in native_top])
        # top_k (a request parameter, or the labels output's) and a chosen output.
        req = self.infer(inputs=[images_input(self.test[:2])],
                         outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(
                             name="labels", parameters={"top_k": pb.InferParameter(int64_param=2)})])
        r = self.call("ModelInfer", req)
        self.assertEqual([(o.name, list(o.shape)) for o in r.outputs], [("labels", [2, 2])])
        self.assertEqual([l.decode() for l in outputs_of(r)["labels"]],
                         [l for t in native_top[:2] for l, _ in t[:2]])
        # The labels output's own top_k wins over the request's; a uint64 value is taken.
        req = self.infer(inputs=[images_input(self.test[:1])],
                         parameters={"top_k": pb.InferParameter(uint64_param=3)},
                         outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(
                             name="labels", parameters={"top_k": pb.InferParameter(int64_param=1)})])
        self.assertEqual(list(self.call("ModelInfer", req).outputs[0].shape), [1, 1])
        req = self.infer(inputs=[images_input(self.test[:1])],
                         parameters={"top_k": pb.InferParameter(uint64_param=3)}, outputs=[
                             pb.ModelInferRequest.InferRequestedOutputTensor(name="labels")])
        self.assertEqual(list(self.call("ModelInfer", req).outputs[0].shape), [1, 3])
        # UINT8 pixels (gray, C = 1) of the lossless PNGs: Classify's probabilities too.
        gray = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("L")) for b in self.test])[..., None]
        t = pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=list(gray.shape))
        r = self.call("ModelInfer", self.infer(inputs=[t], raw=[gray.tobytes()]))
        np.testing.assert_allclose(outputs_of(r)["probabilities"], want, rtol=0, atol=1e-6)
        # Shape [N, 1] is taken too (Triton's clients send BYTES that way).
        r = self.call("ModelInfer", self.infer(inputs=[images_input(self.test[:2], shape=[2, 1])]))
        np.testing.assert_allclose(outputs_of(r)["probabilities"], want[:2], rtol=0, atol=1e-6)

    def test_backbone_embeds_bytes_pixels_and_tensors(self):
        want = self.native.embed(self.test[:4])
        r = self.call("ModelInfer", self.infer("_backbone", [images_input(self.test[:4])]))
        self.assertEqual(r.model_version, "1")
        np.testing.assert_allclose(outputs_of(r)["embedding"], want, rtol=0, atol=1e-6)
        # A layer and pooling, as Embed's options.
        want = self.native.embed(self.test[:2], layer="layer3", pool="max", normalize=True)
        r = self.call("ModelInfer", self.infer(
            "_backbone", [images_input(self.test[:2])],
            parameters={"layer": pb.InferParameter(string_param="layer3"),
                        "pool": pb.InferParameter(string_param="max"),
                        "normalize": pb.InferParameter(bool_param=True)}))
        np.testing.assert_allclose(outputs_of(r)["embedding"], want, rtol=0, atol=1e-6)
        # UINT8 pixels of the decoded PNGs (lossless) = Embed of the files.
        pixels = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in self.test[:3]])
        want = self.native.embed(self.test[:3])
        for raw in (False, True):
            t = pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8",
                                                      shape=list(pixels.shape))
            if not raw:
                t.contents.uint_contents.extend(pixels.reshape(-1).tolist())
            r = self.call("ModelInfer", self.infer("_backbone", [t], [pixels.tobytes()] if raw else []))
            np.testing.assert_allclose(outputs_of(r)["embedding"], want, rtol=0, atol=1e-6)
        # RGBA (C = 4): the alpha channel is dropped, as the decoder does.
        rgba = np.concatenate([pixels, np.full(pixels.shape[:3] + (1,), 255, np.uint8)], axis=3)
        t = pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=list(rgba.shape))
        r = self.call("ModelInfer", self.infer("_backbone", [t], [rgba.tobytes()]))
        np.testing.assert_allclose(outputs_of(r)["embedding"], want, rtol=0, atol=1e-6)
        # An FP32 tensor = Embed's FLOAT32_CHW on the same tensor.
        x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype("<f4")
        e = self.native.inference.Embed(native.EmbedRequest(images=[native.Image(
            tensor=native.RawTensor(layout=native.RawTensor.FLOAT32_CHW, shape=[3, 32, 32],
                                    data=x[i].tobytes())) for i in range(2)]),
            metadata=[("authorization", "Bearer " + KEYS["acme"])])
        want = np.stack([np.asarray(v.values, np.float32) for v in e.embeddings])
        for raw in (False, True):
            t = pb.ModelInferRequest.InferInputTensor(name="tensor", datatype="FP32", shape=[2, 3, 32, 32])
            if not raw:
                t.contents.fp32_contents.extend(x.reshape(-1).tolist())
            r = self.call("ModelInfer", self.infer("_backbone", [t], [x.tobytes()] if raw else []))
            np.testing.assert_allclose(outputs_of(r)["embedding"], want, rtol=0, atol=1e-6)

    def test_label_answers_unknown_under_thresholds(self):
        req = self.infer(inputs=[images_input(self.test[:3])])
        # A global threshold of 1: Classify's answer is always "unknown"; the
        # labels output still ranks the classes.
        self.native.models.SetThresholds(evaluation_pb2.SetThresholdsRequest(
            model="shoes", **{"global": 1.0}))
        try:
            out = outputs_of(self.call("ModelInfer", req))
            self.assertEqual(out["label"], [b"unknown"] * 3)
            self.assertTrue(all(l.decode() in self.classes for l in out["labels"]), out["labels"])
        finally:
            self.native.models.SetThresholds(evaluation_pb2.SetThresholdsRequest(model="shoes"))
        out = outputs_of(self.call("ModelInfer", req))
        self.assertEqual(out["label"], out["labels"])  # top_k 1, no thresholds: the best class

    # --- errors -------------------------------------------------------------
    def test_bad_requests_get_the_right_codes(self):
        img = self.test[:1]
        INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
        T = pb.ModelInferRequest.InferInputTensor
        cases = [
            ("unknown model", self.infer("nope", [images_input(img)]), NOT_FOUND, "nope"),
            ("unknown version", self.infer(inputs=[images_input(img)], model_version="9"), NOT_FOUND,
             "no version 9"),
            ("version not a number", self.infer(inputs=[images_input(img)], model_version="v1"),
             INVALID, "not a version"),
            ("backbone version", self.infer("_backbone", [images_input(img)], model_version="2"),
             NOT_FOUND, "one version"),
            ("backbone version not a number", self.infer("_backbone", [images_input(img)],
                                                         model_version="x"), INVALID, "not a version"),
            ("values in another field", self.infer(inputs=[T(name="images", datatype="BYTES", shape=[1],
                                                             contents=pb.InferTensorContents(
                                                                 bytes_contents=img, fp32_contents=[1.0]))]),
             INVALID, "contents.fp32_contents holds values"),
            ("UINT8 in int_contents", self.infer("_backbone", [T(name="pixels", datatype="UINT8",
                                                                 shape=[1, 1, 1, 1],
                                                                 contents=pb.InferTensorContents(int_contents=[3]))]),
             INVALID, "uint_contents only"),
            ("raw BYTES, more than the shape", self.infer(inputs=[images_input(img, raw=True)],
                                                          raw=[raw_bytes(img * 2)]), INVALID, "more than"),
            ("a huge input name", self.infer(inputs=[T(name="x" * 100000, datatype="BYTES", shape=[1])]),
             INVALID, "no such input"),
            ("untrained model", self.infer("untrained", [images_input(img)]),
             grpc.StatusCode.FAILED_PRECONDITION, "no trained version"),
            ("no input", self.infer(), INVALID, "exactly one"),
            ("unknown input", self.infer(inputs=[T(name="x", datatype="BYTES", shape=[1])]), INVALID,
             "no such input"),
            ("wrong datatype", self.infer(inputs=[T(name="images", datatype="FP32", shape=[1])]),
             INVALID, "must be BYTES"),
            ("wrong shape", self.infer("_backbone", [T(name="pixels", datatype="UINT8", shape=[1, 28, 28])],
                                       [bytes(784)]), INVALID, "[N, H, W, C]"),
            ("zero dimension", self.infer(inputs=[T(name="images", datatype="BYTES", shape=[0])]),
             INVALID, "below 1"),
            ("count vs shape", self.infer(inputs=[images_input(img, shape=[2])]), INVALID,
             "bytes_contents has 1"),
            ("raw count", self.infer(inputs=[images_input(img, raw=True)], raw=[raw_bytes(img)] * 2),
             INVALID, "raw_input_contents has 2"),
            ("raw and contents", self.infer(inputs=[images_input(img)], raw=[raw_bytes(img)]), INVALID,
             "one or the other"),
            ("raw size", self.infer("_backbone", [T(name="pixels", datatype="UINT8", shape=[1, 28, 28, 1])],
                                    [bytes(783)]), INVALID, "needs 784"),
            ("raw BYTES cut", self.infer(inputs=[images_input(img, raw=True)], raw=[raw_bytes(img)[:-1]]),
             INVALID, "only"),
            ("uint8 over 255", self.infer("_backbone", [T(name="pixels", datatype="UINT8", shape=[1, 1, 1, 1],
                                                          contents=pb.InferTensorContents(uint_contents=[300]))]),
             INVALID, "not a UINT8"),
            ("huge shape", self.infer("_backbone", [T(name="tensor", datatype="FP32",
                                                      shape=[1, 3, 1 << 40, 1 << 40])], [b""]),
             INVALID, "too large"),
            ("too many images", self.infer(inputs=[images_input(self.test[:1] * 17)]), INVALID,
             "--max_images_per_request"),
            ("not an image", self.infer(inputs=[images_input([b"not an image"])]), INVALID, "images[0]"),
            ("unknown output", self.infer(inputs=[images_input(img)],
                                          outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")]),
             INVALID, "no output"),
            ("unknown parameter", self.infer(inputs=[images_input(img)],
                                             parameters={"topk": pb.InferParameter(int64_param=2)}),
             INVALID, "unknown parameter"),
            ("top_k of the wrong type", self.infer(inputs=[images_input(img)],
                                                   parameters={"top_k": pb.InferParameter(string_param="2")}),
             INVALID, "int64"),
            ("top_k 0", self.infer(inputs=[images_input(img)],
                                   parameters={"top_k": pb.InferParameter(int64_param=0)}), INVALID, "top_k"),
            ("unknown layer", self.infer("_backbone", [images_input(img)],
                                         parameters={"layer": pb.InferParameter(string_param="layer9")}),
             INVALID, "layer"),
        ]
        for what, req, want, text in cases:
            with self.subTest(what):
                code, details = self.code("ModelInfer", req)
                self.assertEqual(code, want, details)
                self.assertIn(text, details)
        self.assertEqual(self.code("ModelMetadata", pb.ModelMetadataRequest(name="nope"))[0], NOT_FOUND)

    # --- security, tenancy, metrics -------------------------------------------
    def test_keys_tenants_and_metrics(self):
        req = self.infer(inputs=[images_input(self.test[:1])])
        self.assertEqual(self.code("ModelInfer", req, tenant=None)[0], grpc.StatusCode.UNAUTHENTICATED)
        self.assertEqual(self.code("ServerLive", pb.ServerLiveRequest(), tenant=None)[0],
                         grpc.StatusCode.UNAUTHENTICATED)
        # Another tenant's model is not there for globex.
        self.assertEqual(self.code("ModelInfer", req, tenant="globex")[0], grpc.StatusCode.NOT_FOUND)
        self.assertEqual(self.code("ModelMetadata", pb.ModelMetadataRequest(name="shoes"),
                                   tenant="globex")[0], grpc.StatusCode.NOT_FOUND)
        self.call("ModelInfer", req)
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.server.metrics_port) as r:
            text = r.read().decode()
        lines = text.splitlines()
        self.assertTrue(any(l.startswith("tlserve_requests_total{") and 'method="ModelInfer"' in l
                            and 'code="OK"' in l for l in lines), "no ModelInfer OK in /metrics")
        self.assertTrue(any(l.startswith("tlserve_requests_total{") and 'method="ModelInfer"' in l
                            and 'code="UNAUTHENTICATED"' in l for l in lines))
        self.assertTrue(any(l.startswith("tlserve_images_total{") and 'method="ModelInfer"' in l
                            for l in lines), "ModelInfer's images are not counted")


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
