#!/usr/bin/env python3
"""Makes a TorchScript backbone file that tlserve loads with --backbone.

A torchvision ResNet, scripted (torch.jit.script(model).save(path)), with two
extra files: preprocess.json (resize, crop, mean, std, resize_mode,
interpolation) and tlserve.json (name, whether the weights are pretrained).
Weights are random with a fixed seed unless --weights gives a state-dict file:
no weights can be downloaded here.

--resize-mode: "pil" resizes exactly as torchvision's transforms on PIL images
(Pillow's Image.resize), "tensor" as torchvision on uint8 tensors. Default:
"pil" with --weights (weights people bring were mostly trained with PIL
transforms), "tensor" for random weights (tests, demos, benchmarks).

  /usr/bin/python3 scripts/make_backbone.py --arch resnet50 --out resnet50.pt
  /usr/bin/python3 scripts/make_backbone.py --arch resnet18 --weights r18.pth --out r18.pt
"""
import argparse
import json
import os
import sys

import torch
import torchvision


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50", choices=["resnet18", "resnet34", "resnet50", "resnet101"])
    p.add_argument("--out", required=True, help="output .pt file")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights")
    p.add_argument("--weights", help="a state_dict file (torch.save(model.state_dict(), path))")
    p.add_argument("--num-classes", type=int, default=1000, help="outputs of the head (fc)")
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--mean", type=float, nargs=3, default=[0.485, 0.456, 0.406])
    p.add_argument("--std", type=float, nargs=3, default=[0.229, 0.224, 0.225])
    p.add_argument("--name", help="name shown by the server (default: the arch)")
    p.add_argument("--resize-mode", choices=["pil", "tensor"],
                   help="how the server resizes (default: pil with --weights, else tensor)")
    p.add_argument("--interpolation", choices=["bilinear", "bicubic"], default="bilinear")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    model = getattr(torchvision.models, args.arch)(weights=None, num_classes=args.num_classes)
    pretrained = False
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location="cpu"))
        pretrained = True
    model.eval()
    mode = args.resize_mode or ("pil" if pretrained else "tensor")
    extra = {
        "preprocess.json": json.dumps(
            {"resize": args.resize, "crop": args.crop, "mean": args.mean, "std": args.std,
             "resize_mode": mode, "interpolation": args.interpolation}),
        "tlserve.json": json.dumps({"name": args.name or args.arch, "pretrained": pretrained}),
    }
    tmp = args.out + ".tmp"
    torch.jit.script(model).save(tmp, _extra_files=extra)
    os.replace(tmp, args.out)
    what = "weights from " + args.weights if pretrained else (
        "RANDOM weights (seed %d): not pretrained, for tests and demos only" % args.seed)
    print("wrote %s: %s, %s; resized as %s (%s)" % (args.out, args.arch, what, mode, args.interpolation),
          file=sys.stderr)


if __name__ == "__main__":
    main()
