"""RetinaNet R50-FPN inference: ours vs torchvision's, same weights, same post-processing.

    python -m experiments.bench.retinanet_inference               # part of `make bench`
    python -m experiments.bench.retinanet_inference --device cuda --precision bf16-mixed

Both models hold the same state dict (torchvision's randomly initialised `retinanet_resnet50_fpn`,
FrozenBatchNorm backbone as torchvision builds it; ours with ``norm=frozen_bn`` loads it strictly)
and the same resize (shorter side ``--min-size``), score threshold, top-k, NMS and detection
limit. Images per second in eval mode under ``torch.inference_mode``. Goal: ≥ 1.0× torchvision.
Writes retinanet_inference.md next to this file.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
import torchvision

from experiments.lib.benchmark import compare, machine_load, markdown_table, write_report
from normlab.models import retinanet_resnet50_fpn

HERE = Path(__file__).resolve().parent
# Arguments of the tiny run in `make test` (tests/experiments/test_benchmarks.py).
SMOKE = [
    "--images",
    "1",
    "--height",
    "64",
    "--width",
    "80",
    "--min-size",
    "64",
    "--max-size",
    "100",
    "--repeats",
    "1",
]
GOAL = 1.0


def models(min_size: int, max_size: int, device: str) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    settings = {"min_size": min_size, "max_size": max_size}
    reference = torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, **settings
    )
    ours = retinanet_resnet50_fpn(num_classes=91, norm="frozen_bn", **settings)
    ours.load_state_dict(reference.state_dict())
    for name in ("score_thresh", "nms_thresh", "detections_per_img", "topk_candidates"):
        if getattr(ours, name) != getattr(reference, name):
            raise RuntimeError(f"post-processing differs: {name}")
    return {"torchvision": reference.to(device).eval(), "normlab": ours.to(device).eval()}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2, help="images per call")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--min-size", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    # ±10 % round-to-round noise on a shared 2-core machine: 10 rounds for a stable ratio.
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--out", type=Path, default=HERE / "retinanet_inference.md")
    args = parser.parse_args(argv)
    load_before = machine_load()

    generator = torch.Generator().manual_seed(0)
    images = [
        torch.rand(3, args.height, args.width, generator=generator).to(args.device)
        for _ in range(args.images)
    ]
    autocast = (
        torch.autocast(args.device, dtype=torch.bfloat16)
        if args.precision == "bf16-mixed"
        else contextlib.nullcontext()
    )

    def inference(model: torch.nn.Module):
        def call() -> None:
            with torch.inference_mode(), autocast:
                model(images)

        return call

    candidates = {
        name: inference(model)
        for name, model in models(args.min_size, args.max_size, args.device).items()
    }
    timings = compare(candidates, repeats=args.repeats, warmup=1, device=torch.device(args.device))
    speed = 1 / timings[1].ratio_to(timings[0])
    rates = " · ".join(f"{t.name} {args.images / t.median:.2f} images/s" for t in timings)
    return write_report(
        args.out,
        "RetinaNet R50-FPN inference: normlab vs torchvision",
        f"python -m experiments.bench.retinanet_inference --images {args.images} --height "
        f"{args.height} --width {args.width} --min-size {args.min_size} --max-size "
        f"{args.max_size} --repeats {args.repeats} --device {args.device} "
        f"--precision {args.precision}",
        f"Seconds per call of {args.images} images {args.height}×{args.width} (resized to a "
        f"shorter side of {args.min_size}), eval mode, {args.precision}.",
        markdown_table(timings, unit="s"),
        f"{rates}. normlab / torchvision throughput = {speed:.3f}: "
        f"{'meets' if speed >= GOAL else 'misses'} the goal ≥ {GOAL}.",
        load_before=load_before,
    )


if __name__ == "__main__":
    print(main())
