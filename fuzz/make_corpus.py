#!/usr/bin/env python3
"""Writes the fuzzers' seed corpus into fuzz/corpus/<fuzzer>/ (committed).

Tiny images made with PIL (every colour type and format the decoder reads),
and serialized requests made by `protoc --encode` from text, so no generated
Python code is needed. Run from the repository root: fuzz/make_corpus.py
"""
import io
import os
import struct
import subprocess
import zlib

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def pixels(w, h, mode):
    im = Image.new(mode, (w, h))
    bands = len(im.getbands())
    im.putdata([tuple((x * 37 + y * 11 + b * 71) % 256 for b in range(bands))
                if bands > 1 else (x * 37 + y * 11) % 256
                for y in range(h) for x in range(w)])
    return im


def encode(im, fmt, **kw):
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def gray16_png(w, h):
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)
    raw = b"".join(b"\x00" + b"".join(struct.pack(">H", (x * 4099 + y * 257) % 65536)
                                      for x in range(w)) for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) +
            png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))


def images():
    return {
        "rgb.png": encode(pixels(8, 6, "RGB"), "PNG"),
        "gray.png": encode(pixels(5, 7, "L"), "PNG"),
        "rgba.png": encode(pixels(4, 4, "RGBA"), "PNG"),
        "palette.png": encode(pixels(6, 6, "RGB").convert("P"), "PNG"),
        "gray16.png": gray16_png(3, 3),
        "wide.png": encode(pixels(40, 1, "RGB"), "PNG"),
        "rgb.jpg": encode(pixels(8, 8, "RGB"), "JPEG", quality=90),
        "gray.jpg": encode(pixels(7, 5, "L"), "JPEG", quality=90),
        "progressive.jpg": encode(pixels(16, 9, "RGB"), "JPEG", progressive=True),
        "cmyk.jpg": encode(pixels(4, 4, "CMYK"), "JPEG"),
        "subsampled.jpg": encode(pixels(17, 3, "RGB"), "JPEG", subsampling=2),
    }


def text_bytes(b):
    return '"' + "".join("\\%03o" % c for c in b) + '"'


def protoc_encode(proto, message, text, package="tlserve.v1"):
    return subprocess.run(
        ["protoc", "-I" + os.path.join(ROOT, "proto"), "--encode=%s.%s" % (package, message), proto],
        input=text.encode(), stdout=subprocess.PIPE, check=True, cwd=ROOT).stdout


def write(fuzzer, name, data):
    d = os.path.join(CORPUS, fuzzer)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main():
    imgs = images()
    for name, data in imgs.items():
        write("decode_preprocess_fuzzer", name, data)
    write("decode_preprocess_fuzzer", "not_an_image.bin", b"GIF89a\x01\x00\x01\x00")

    png, jpg = imgs["rgb.png"], imgs["rgb.jpg"]
    image_sets = {
        "encoded": 'images { name: "a.png" encoded: %s } images { encoded: %s }'
                   % (text_bytes(png), text_bytes(jpg)),
        "uint8": 'images { name: "t" tensor { layout: UINT8_HWC shape: [2, 2, 3] data: %s } }'
                 % text_bytes(bytes(range(12))),
        "float": 'images { tensor { layout: FLOAT32_CHW shape: [3, 1, 1] data: %s } }'
                 % text_bytes(struct.pack("<3f", 0.5, -1.0, 2.0)),
        "nodata": 'images { name: "empty" }',
        "badlayout": 'images { tensor { shape: [1] data: "x" } }',
    }
    for name, text in image_sets.items():
        write("image_inputs_fuzzer", "classify_" + name,
              protoc_encode("tlserve/v1/models.proto", "ClassifyRequest",
                            'model: "m" version: 1 top_k: 2 ' + text))
        write("image_inputs_fuzzer", "embed_" + name,
              protoc_encode("tlserve/v1/inference.proto", "EmbedRequest", text))

    # The Open Inference Protocol's ModelInfer: each input kind, in contents and raw.
    infers = {
        "bytes": 'inputs { name: "images" datatype: "BYTES" shape: [2] contents { bytes_contents: %s '
                 'bytes_contents: %s } }' % (text_bytes(png), text_bytes(jpg)),
        "bytes_raw": 'inputs { name: "images" datatype: "BYTES" shape: [1, 1] } raw_input_contents: %s'
                     % text_bytes(struct.pack("<I", len(png)) + png),
        "uint8": 'inputs { name: "pixels" datatype: "UINT8" shape: [1, 2, 2, 3] contents { %s } }'
                 % " ".join("uint_contents: %d" % (i * 20) for i in range(12)),
        "uint8_raw": 'inputs { name: "pixels" datatype: "UINT8" shape: [2, 1, 2, 1] } '
                     'raw_input_contents: %s' % text_bytes(bytes(range(4))),
        "fp32": 'inputs { name: "tensor" datatype: "FP32" shape: [1, 3, 1, 1] contents { '
                'fp32_contents: [0.5, -1, 2] } }',
        "fp32_raw": 'inputs { name: "tensor" datatype: "FP32" shape: [1, 3, 1, 1] } '
                    'raw_input_contents: %s' % text_bytes(struct.pack("<3f", 0.5, -1.0, 2.0)),
    }
    for name, text in infers.items():
        write("image_inputs_fuzzer", "oip_" + name,
              protoc_encode("inference/open_inference.proto", "ModelInferRequest",
                            'model_name: "m" ' + text, package="inference"))

    uploads = {
        "two_classes": 'dataset: "cats-v1.0" examples { name: "a.png" label: "cat" encoded: %s } '
                       'examples { name: "b.jpg" label: "dog" encoded: %s }'
                       % (text_bytes(png), text_bytes(jpg)),
        "strict_gray": 'dataset: "g" strict: true examples { label: "x" encoded: %s }'
                       % text_bytes(imgs["gray16.png"]),
        "bad_name": 'dataset: "-bad name" examples { label: "" encoded: "" }',
        "bad_image": 'dataset: "d" examples { name: "t.jpg" label: "l\\001" encoded: %s }'
                     % text_bytes(jpg[: len(jpg) // 2]),
    }
    for name, text in uploads.items():
        write("dataset_upload_fuzzer", name,
              protoc_encode("tlserve/v1/datasets.proto", "UploadDatasetRequest", text))


if __name__ == "__main__":
    main()
