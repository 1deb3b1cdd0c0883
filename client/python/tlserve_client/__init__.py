"""A Python client for tlserve, on stubs generated from proto/ (see _stubs).

    from tlserve_client import Client
    c = Client("localhost:50051")
    vectors = c.embed([open("cat.jpg", "rb").read()])          # numpy N×D
    c.upload("shoes", [("sandal", "a.png", png_bytes), ...])
    c.create_model("shoes", dataset="shoes")
    job = c.train("shoes", "shoes", on_progress=print, epochs=30)
    c.classify("shoes", [png_bytes])                             # [[(label, p), ...]]
    c.export("shoes", "shoes.pt")

Errors are grpc.RpcError with the server's canonical code and message.
"""
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


class Client:
    """One channel to a tlserve server; its methods are synchronous."""

    def __init__(self, target="localhost:50051", timeout=10.0):
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", _MESSAGE_BYTES),
            ("grpc.max_receive_message_length", _MESSAGE_BYTES)])
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ConnectionError("no tlserve server answers at %s after %.0f s" % (target, timeout))
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.datasets = datasets_pb2_grpc.DatasetsStub(self.channel)
        self.models = models_pb2_grpc.ModelsStub(self.channel)

    def close(self):
        self.channel.close()

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
