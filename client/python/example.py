#!/usr/bin/env python3
"""tlserve from Python: embed, upload an image folder, train a head with
progress, classify held-out images, optionally export the model.

  /usr/bin/python3 client/python/example.py --server localhost:50051 \\
      --train DIR/train --test DIR/test --model shoes [--export shoes.pt]

DIR/train and DIR/test are ImageFolder trees: DIR/<class>/<image>.png|.jpg.
Needs Debian's python3-grpcio, protobuf-compiler and protobuf-compiler-grpc
(stubs are generated from proto/ on first use).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tlserve_client import Client, image_folder, models_pb2  # noqa: E402


def show_progress(job):
    state = models_pb2.Job.State.Name(job.state)
    if job.epochs:
        e = job.epochs[-1]
        line = "  %-9s epoch %3d  loss %.4f  train %.3f  val %.3f  %6.0f img/s  eta %4.0fs" % (
            state, e.epoch, e.train_loss, e.train_accuracy, e.validation_accuracy,
            e.images_per_second, e.eta_seconds)
    else:
        line = "  %-9s %s" % (state, job.phase)
    print("\r" + line.ljust(90), end="" if sys.stdout.isatty() else "\n", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", default=os.environ.get("TLSERVE_SERVER", "localhost:50051"))
    p.add_argument("--token", default=os.environ.get("TLSERVE_TOKEN"),
                   help="API key for a server with --api_keys (default $TLSERVE_TOKEN)")
    p.add_argument("--tls_ca", help="TLS: the CA (PEM file) the server's certificate chains to")
    p.add_argument("--train", required=True, help="ImageFolder tree to train on")
    p.add_argument("--test", required=True, help="ImageFolder tree to classify")
    p.add_argument("--model", default="python-example")
    p.add_argument("--epochs", type=int, default=0, help="0: the server's default")
    p.add_argument("--export", help="also download the model as TorchScript to this file")
    args = p.parse_args()

    with Client(args.server, token=args.token, root_certificates=args.tls_ca) as c:
        b = c.describe_backbone()
        print("backbone %s: %d stages, embedding dim %d, input %s" % (
            b.file_name, len(b.stages), b.embedding_dim, "x".join(map(str, b.input_shape))))
        train, test = image_folder(args.train), image_folder(args.test)
        vectors = c.embed([data for _, _, data in test[:4]])
        print("embed: %d images -> %s vectors, first starts %s" % (
            len(vectors), vectors.shape, ", ".join("%.4f" % v for v in vectors[0][:3])))

        start = time.time()
        r = c.upload(args.model, train)
        print("upload: %d accepted, %d rejected into dataset %s (%d images) in %.1f s" % (
            r.accepted, len(r.rejected), r.dataset.name, r.dataset.images, time.time() - start))
        c.create_model(args.model, dataset=args.model)
        print("train:")
        job = c.train(args.model, args.model, on_progress=show_progress, epochs=args.epochs)
        print()
        if job.state != models_pb2.Job.SUCCEEDED:
            sys.exit("training %s: %s" % (models_pb2.Job.State.Name(job.state), job.error))
        print("trained version %d" % job.version)

        predictions = c.classify(args.model, [data for _, _, data in test])
        correct = sum(top[0][0] == label for (label, _, _), top in zip(test, predictions))
        print("classify: %d/%d held-out images right (accuracy %.3f)" % (
            correct, len(test), correct / max(1, len(test))))
        if args.export:
            info = c.export(args.model, args.export)
            print("export: %s v%d -> %s (%d bytes, sha256 %s)" % (
                info.model, info.version, args.export, info.size_bytes, info.sha256[:12]))


if __name__ == "__main__":
    main()
