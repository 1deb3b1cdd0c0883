"""A Python client for tlserve, on stubs generated from proto/ (see _stubs).

    from tlserve_client import Client
    c = Client("localhost:50051")
    vectors = c.embed([open("cat.jpg", "rb").read()])          # numpy N×D
    c.upload("shoes", [("sandal", "a.png", png_bytes), ...])
    c.create_model("shoes", dataset="shoes")
    job = c.train("shoes", "shoes", on_progress=print, epochs=30)
    c.classify("shoes", [png_bytes])                             # [[(label, p), ...]]
    c.export("shoes", "shoes.pt")

A server with API keys and TLS (see Client for the arguments):

    c = Client("tlserve.example.com:50051", token=os.environ["TLSERVE_TOKEN"],
               root_certificates="ca.pem")

Errors are grpc.RpcError with the server's canonical code and message
(UNAUTHENTICATED: no key or one the server does not know; PERMISSION_DENIED:
the key's role does not allow the call).
"""
import collections
import hashlib
import os

import grpc
import numpy as np

from . import _stubs

_stubs.load()
from tlserve.v1 import datasets_pb2, datasets_pb2_grpc  # noqa: E402
from tlserve.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402
from tlserve.v1 import models_pb2, models_pb2_grpc  # noqa: E402

__all__ = ["Client", "image_folder", "is_validation", "datasets_pb2", "inference_pb2", "models_pb2"]

_MESSAGE_BYTES = 64 << 20
_FINAL = (models_pb2.Job.SUCCEEDED, models_pb2.Job.FAILED, models_pb2.Job.CANCELLED)


def _image(data, name=""):
    return inference_pb2.Image(name=name, encoded=data)


def _pem(value, what):
    """PEM bytes from bytes or str (PEM text itself when it holds a
    "-----BEGIN" line, otherwise a file name) or a path; None stays None."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and "-----BEGIN" in value:
        return value.encode()
    try:
        with open(value, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError("cannot read %s file %s: %s" % (what, value, e.strerror)) from None


class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                         "compression")), grpc.ClientCallDetails):
    pass


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds "authorization: Bearer TOKEN" to every call, plaintext or TLS (a
    call that names its own "authorization" keeps it). Metadata, not gRPC
    call credentials: gRPC sends those over TLS only, and a token over
    plaintext is what a loopback server or one behind a TLS proxy needs."""

    def __init__(self, token):
        self._header = ("authorization", "Bearer " + token)

    def _details(self, d):
        metadata = list(d.metadata or ())
        if not any(k == "authorization" for k, _ in metadata):
            metadata.append(self._header)
        return _CallDetails(d.method, d.timeout, metadata, d.credentials,
                            getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


class Client:
    """One channel to a tlserve server; its methods are synchronous.

    token: the API key, sent as "authorization: Bearer TOKEN" on every call
      (over plaintext too); None or "": no key. The library does not read
      $TLSERVE_TOKEN itself: pass token=os.environ.get("TLSERVE_TOKEN").
    root_certificates, certificate_chain, private_key: PEM, each as bytes,
      as PEM text, or as a file name (str or path): the CA the server's
      certificate must chain to, and the client's certificate and key for
      servers that require one (mTLS; both or neither). Any of them turns
      TLS on; tls=True alone uses TLS with the system's roots.
    lb_policy: how calls spread over the addresses `target` resolves to:
      None or "pick_first" (one connection, gRPC's default) or "round_robin"
      (every address: several replicas behind a headless Service,
      "dns:///tlserve-headless.NAMESPACE.svc:50051", or a list,
      "ipv4:10.0.0.1:50051,10.0.0.2:50051").
    """

    def __init__(self, target="localhost:50051", timeout=10.0, token=None,
                 root_certificates=None, private_key=None, certificate_chain=None, tls=False,
                 lb_policy=None):
        roots = _pem(root_certificates, "root_certificates")
        key = _pem(private_key, "private_key")
        chain = _pem(certificate_chain, "certificate_chain")
        if (key is None) != (chain is None):
            raise ValueError("a client certificate needs its private key and a key its "
                             "certificate (certificate_chain and private_key go together)")
        if token and any(not " " <= c <= "~" for c in token):
            raise ValueError("the API key has a character other than printable ASCII "
                             "(a stray newline?)")
        tls = tls or roots is not None or chain is not None
        if lb_policy not in (None, "", "pick_first", "round_robin"):
            raise ValueError("lb_policy %r: use pick_first or round_robin" % (lb_policy,))
        options = [("grpc.max_send_message_length", _MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", _MESSAGE_BYTES)]
        if lb_policy:
            options.append(("grpc.lb_policy_name", lb_policy))
        if tls:
            self._raw_channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(
                root_certificates=roots, private_key=key, certificate_chain=chain), options)
        else:
            self._raw_channel = grpc.insecure_channel(target, options)
        self.channel = self._raw_channel
        if token:
            self.channel = grpc.intercept_channel(self._raw_channel, _BearerToken(token))
        try:
            grpc.channel_ready_future(self._raw_channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            self._raw_channel.close()
            # gRPC does not say why; a failed TLS handshake looks the same.
            raise ConnectionError("no tlserve server answers at %s after %.0f s (%s)" % (
                target, timeout,
                "over TLS: is it running, does its certificate chain to root_certificates and "
                "name this address, does it require a client certificate?" if tls else
                "is it running? does it use TLS? see root_certificates"))
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.datasets = datasets_pb2_grpc.DatasetsStub(self.channel)
        self.models = models_pb2_grpc.ModelsStub(self.channel)

    def close(self):
        self._raw_channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- inference ---------------------------------------------------------
    def describe_backbone(self):
        return self.inference.DescribeBackbone(inference_pb2.DescribeBackboneRequest())

    def embed(self, images, layer="", pool="avg", normalize=False, batch=64):
        """Encoded images (bytes) -> float32 array N×D, `batch` to a request."""
        options = inference_pb2.EmbedOptions(
            layer=layer, normalize=normalize,
            pool=inference_pb2.POOL_MAX if pool == "max" else inference_pb2.POOL_AVG)
        out = []
        for i in range(0, len(images), batch):
            r = self.inference.Embed(inference_pb2.EmbedRequest(
                images=[_image(b) for b in images[i:i + batch]], options=options))
            out.extend(np.asarray(e.values, dtype=np.float32) for e in r.embeddings)
        return np.stack(out) if out else np.zeros((0, 0), np.float32)

    # --- datasets ----------------------------------------------------------
    def upload(self, dataset, examples, batch=64, strict=False):
        """Uploads (label, name, encoded bytes) triples in one stream, `batch`
        to a message; returns UploadDatasetResponse (accepted, rejected)."""
        examples = list(examples)

        def requests():
            # The last message commits: a stream cut short stores nothing.
            starts = list(range(0, len(examples), batch)) or [0]
            for i in starts:
                yield datasets_pb2.UploadDatasetRequest(
                    dataset=dataset, strict=strict, commit=(i == starts[-1]),
                    examples=[datasets_pb2.Example(label=l, name=n, encoded=b)
                              for l, n, b in examples[i:i + batch]])
        return self.datasets.UploadDataset(requests())

    # --- models and training -----------------------------------------------
    def create_model(self, name, dataset="", classes=(), hidden=(), dropout=0.0):
        return self.models.CreateModel(models_pb2.CreateModelRequest(
            name=name, dataset=dataset, classes=list(classes),
            head=models_pb2.HeadSpec(hidden=list(hidden), dropout=dropout)))

    def unfreeze(self, model, stages=(), from_stage=""):
        req = models_pb2.UnfreezeLayersRequest(model=model, stages=list(stages))
        setattr(req, "from", from_stage)  # `from` is a Python keyword
        return self.models.UnfreezeLayers(req)

    def train(self, model, dataset, on_progress=None, **options):
        """Starts a job with TrainingOptions(**options) and follows it with
        WatchJob; `on_progress(job)` sees every update. Returns the final Job
        (its state may be FAILED or CANCELLED: check it)."""
        job = self.models.StartTraining(models_pb2.StartTrainingRequest(
            model=model, dataset=dataset, options=models_pb2.TrainingOptions(**options)))
        for update in self.models.WatchJob(models_pb2.WatchJobRequest(id=job.id)):
            job = update
            if on_progress:
                on_progress(job)
            if job.state in _FINAL:
                break
        return job

    def classify(self, model, images, top_k=1, version=0, batch=64):
        """Encoded images -> per image a list of (label, probability), best
        first; streamed with StreamClassify. A bad image raises ValueError."""
        def requests():
            for i in range(0, len(images), batch):
                yield models_pb2.StreamClassifyRequest(
                    model=model, version=version, top_k=top_k,
                    images=[_image(b, str(i + k)) for k, b in enumerate(images[i:i + batch])])
        out = [None] * len(images)
        for response in self.models.StreamClassify(requests()):
            for r in response.results:
                if r.HasField("error"):
                    raise ValueError("image %d: %s" % (r.index, r.error.message))
                out[r.index] = [(p.label, p.probability) for p in r.classification.top]
        return out

    def export(self, model, path, version=0):
        """Downloads the model as a TorchScript file (checked against the size
        and SHA-256 the server announces); returns ExportInfo."""
        tmp = path + ".tmp"
        info, digest, size = None, hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as f:
                for msg in self.models.ExportModel(
                        models_pb2.ExportModelRequest(model=model, version=version)):
                    if msg.HasField("info"):
                        info = msg.info
                    f.write(msg.chunk)
                    digest.update(msg.chunk)
                    size += len(msg.chunk)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            os.unlink(tmp)
            raise
        if info is None or size != info.size_bytes or digest.hexdigest() != info.sha256:
            os.unlink(tmp)
            raise IOError("export of %s arrived damaged (%d bytes)" % (model, size))
        os.replace(tmp, path)
        return info


def example_hash(name, data):
    """The server's per-example hash (DatasetCatalog::ExampleHash): FNV-1a 64
    over the example's name, 0xff, its bytes, 0xff."""
    h = 1469598103934665603
    for part in (name.encode(), data):
        for c in part + b"\xff":
            h = ((h ^ c) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


def is_validation(name, data, fraction=0.15):
    """Whether a training job holds this example out for validation (with
    TrainingOptions.validation_fraction = fraction): the split is a pure
    function of name and bytes, so a reference can train on the same rows."""
    return (example_hash(name, data) % 1000000) < fraction * 1000000


def image_folder(root, per_class=None):
    """(label, name, encoded bytes) for the images of an ImageFolder tree
    root/<label>/<image>.png|.jpg, sorted by label then file name; the first
    `per_class` files of each label when given. `name` is "label/file"."""
    out = []
    for label in sorted(os.listdir(root)):
        d = os.path.join(root, label)
        if not os.path.isdir(d):
            continue
        files = [f for f in sorted(os.listdir(d)) if f.lower().endswith((".png", ".jpg", ".jpeg"))]
        for f in files[:per_class]:
            with open(os.path.join(d, f), "rb") as fh:
                out.append((label, "%s/%s" % (label, f), fh.read()))
    return out
