"""The digits benchmark: tokenizer, two-stage vs one-stage generator and samplers, judged independently.

    python benchmarks/digits.py tokenizer --tokenizer gpstoken/weights/digits/tokenizer
    python benchmarks/digits.py generator --model gpstoken/weights/digits [--num-per-class 50]
    python benchmarks/digits.py curve --tokenizer TOK --layout RUN_L --texture RUN_T --one-stage RUN_O
    python benchmarks/digits.py samplers --model gpstoken/weights/digits
    python benchmarks/digits.py grid --model gpstoken/weights/digits --out benchmarks/figures/digits_grid.png

Data: scikit-learn's 8x8 digits, bicubic-upscaled to 32x32 (``gpstoken.generation.digits``); models are
trained on ``digits:train``, real images for the Frechet distance are ``digits:test`` (359 held out).
The judge is an MLP on 16x16 grey pixels trained on ``digits:train`` (not one of our models): its
per-class accuracy on generated digits says whether the generator drew the class it was asked for, and
the Frechet distance in its hidden-layer space (64-D) compares the generated and the real distribution.

``curve`` reads the EMA weights of every checkpoint in the generator runs (``training/train_generator.py``
with ``--keep`` large enough to keep them all): two-stage at step s uses the layout AND texture models
after s steps each; one-stage uses its model after s steps. Results go to JSON + a PNG plot (PIL).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from gpstoken_core.metrics import psnr
from PIL import Image, ImageDraw

from gpstoken import GPSTokenizer
from gpstoken.generation import digits
from gpstoken.generation.evaluation import generate_per_class, judge_metrics
from gpstoken.generation.models import SiT
from gpstoken.generation.pipeline import GPSGenerator

FIGURES = Path(__file__).resolve().parent / "figures"
CLASSES = list(range(digits.NUM_CLASSES))


# ----------------------------------------------------------------------------- tokenizer
def tokenizer_report(folder: str | Path, batch: int = 64) -> dict:
    """Reconstruction PSNR (mean over images) on digits:test, and the judge on real vs reconstructed."""
    tok = GPSTokenizer.from_pretrained(folder).eval()
    images, labels = digits.digit_images("test")
    recon = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            x = tok.reconstruct(np.array(images[start : start + batch]))
            recon.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    recon = np.concatenate(recon)
    judge = digits.load_judge()
    real_acc, recon_acc = judge.accuracy(images, labels), judge.accuracy(recon, labels)
    return {
        "images": len(images), "psnr": float(np.mean([psnr(a, b) for a, b in zip(images, recon)])),
        "judge_accuracy_real": real_acc, "judge_accuracy_reconstructed": recon_acc,
        "ratio": recon_acc / real_acc, "tokens": tok.config.tokens_per_tile,
    }  # fmt: skip


# ----------------------------------------------------------------------------- generators
def judged(gen: GPSGenerator, num_per_class: int, seed: int = 0, **sample) -> dict:
    """Judge accuracy (overall, per class) and Frechet distance vs digits:test, with seconds per image."""
    t0 = time.perf_counter()
    images, labels = generate_per_class(gen, CLASSES, num_per_class, seed=seed, batch=50, progress=False, **sample)
    seconds = (time.perf_counter() - t0) / len(images)
    out = judge_metrics(digits.load_judge(), images, labels, digits.digit_images("test")[0])
    return out | {"seconds_per_image": seconds, "images": len(images)}


def ema_model(checkpoint: Path, part: str = "ema") -> SiT:
    """The EMA weights (``part`` "ema"; "model": the raw weights) of a train_generator checkpoint folder
    (step_N/) as a SiT."""
    from safetensors.torch import load_file

    from gpstoken.generation.config import SiTConfig

    state = json.loads((checkpoint / "state.json").read_text())
    model = SiT(SiTConfig.from_dict(state["model_config"]))
    model.load_state_dict(load_file(str(checkpoint / f"{part}.safetensors")))
    return model.eval()


def checkpoints(run: Path) -> dict[int, Path]:
    return {int(p.name.split("_")[1]): p for p in sorted((run / "checkpoints").glob("step_*")) if (p / "state.json").exists()}


def curve(args) -> dict:
    tok = GPSTokenizer.from_pretrained(args.tokenizer).eval()
    lay, tex, one = checkpoints(args.layout), checkpoints(args.texture), checkpoints(args.one_stage)
    steps = sorted(set(lay) & set(tex) & set(one))
    if args.at:
        steps = [s for s in steps if s in set(args.at)]
    if not steps:
        raise SystemExit(f"no common checkpoint steps in {args.layout}, {args.texture}, {args.one_stage}")
    sample = {"cfg_scale": args.cfg, "sampler": args.sampler, "texture_steps": args.steps, "layout_cfg_scale": args.layout_cfg,
              "guidance": (args.guidance_low, 1.0), "layout_steps": args.layout_steps}
    rows = []
    for s in steps:
        w = args.weights
        two = judged(GPSGenerator(ema_model(tex[s], w), tok, layout=ema_model(lay[s], w)), args.num_per_class, **sample)
        single = judged(GPSGenerator(ema_model(one[s], w), tok), args.num_per_class, **sample)
        rows.append({"step": s, "two_stage": two, "one_stage": single})
        print(
            f"step {s}: two-stage acc {two['accuracy']:.3f} FD {two['frechet_distance']:.2f} | "
            f"one-stage acc {single['accuracy']:.3f} FD {single['frechet_distance']:.2f}", flush=True,
        )  # fmt: skip
    report = {"sample": {**sample, "guidance": list(sample["guidance"])}, "weights": args.weights, "num_per_class": args.num_per_class, "rows": rows}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=1))
    plot_curve(rows, args.plot)
    print_table(rows[-1])
    return report


def print_table(row: dict) -> None:
    print(f"\n| at step {row['step']} | judge accuracy | Frechet distance | " + " | ".join(str(c) for c in CLASSES) + " |")
    print("|---|---|---|" + "---|" * len(CLASSES))
    for name in ("two_stage", "one_stage"):
        r = row[name]
        per = " | ".join(f"{r['per_class_accuracy'][str(c)]:.2f}" for c in CLASSES)
        print(f"| {name.replace('_', '-')} | {r['accuracy']:.3f} | {r['frechet_distance']:.2f} | {per} |")


def plot_curve(rows: list[dict], path: Path) -> None:
    """Two panels (judge accuracy, Frechet distance) against training steps, drawn with PIL."""
    w, h, pad = 360, 260, 48
    img = Image.new("RGB", (2 * w, h), "white")
    draw = ImageDraw.Draw(img)
    steps = [r["step"] for r in rows]
    colors = {"two_stage": (31, 119, 180), "one_stage": (214, 39, 40)}
    for panel, (key, title) in enumerate((("accuracy", "judge accuracy"), ("frechet_distance", "Frechet distance (judge)"))):
        x0 = panel * w
        values = [r[n][key] for r in rows for n in colors]
        lo, hi = (0.0, 1.0) if key == "accuracy" else (0.0, max(values) * 1.05 or 1.0)
        def sx(s, x0=x0):  # step -> pixel column of this panel
            return x0 + pad + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (w - 1.5 * pad)

        def sy(v, lo=lo, hi=hi):  # value -> pixel row
            return h - pad + (v - lo) / (hi - lo) * (2 * pad - h)

        draw.rectangle([x0 + pad, sy(hi), x0 + w - pad // 2, sy(lo)], outline="black")
        draw.text((x0 + pad, 8), title, fill="black")
        for v in np.linspace(lo, hi, 5):
            draw.text((x0 + 4, sy(v) - 6), f"{v:.2f}" if hi <= 1 else f"{v:.1f}", fill="black")
        shown = -1e9
        for s in steps:  # labels that would overlap the previous one are left out
            if sx(s) - shown >= 30:
                draw.text((sx(s) - 10, h - pad + 6), str(s), fill="black")
                shown = sx(s)
        draw.text((x0 + w // 2 - 30, h - 18), "training steps", fill="black")
        for k, (name, color) in enumerate(colors.items()):
            pts = [(sx(r["step"]), sy(r[name][key])) for r in rows]
            draw.line(pts, fill=color, width=2)
            for p in pts:
                draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=color)
            draw.text((x0 + w - 140 + 70 * k, 8), name.replace("_", "-"), fill=color)  # legend in the title row
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    print(f"plot -> {path}")


def samplers(args) -> list[dict]:
    """Texture sampler quality vs time: the official SDE (250 steps) and Heun at 8 / 16 / 32 steps."""
    gen = GPSGenerator.from_pretrained(args.model)
    rows = []
    print("| texture sampler | model calls | judge accuracy | Frechet distance | ms per image |")
    print("|---|---|---|---|---|")
    for sampler, steps in (("sde", 250), ("heun", 8), ("heun", 16), ("heun", 32)):
        r = judged(gen, args.num_per_class, cfg_scale=args.cfg, sampler=sampler, texture_steps=steps, layout_cfg_scale=args.layout_cfg)
        calls = steps if sampler == "sde" else 2 * steps - 1
        rows.append({"sampler": sampler, "steps": steps, **r})
        print(f"| {sampler} {steps} | {calls} | {r['accuracy']:.3f} | {r['frechet_distance']:.2f} | {1000 * r['seconds_per_image']:.1f} |", flush=True)
    if args.report:
        args.report.write_text(json.dumps(rows, indent=1))
    return rows


def grid(args) -> Path:
    """A picture: one row per class, --per-class generated digits, each shown 2x (nearest)."""
    gen = GPSGenerator.from_pretrained(args.model)
    images, labels = generate_per_class(
        gen, CLASSES, args.per_class, seed=args.seed, batch=50, progress=False, cfg_scale=args.cfg,
        sampler=args.sampler, texture_steps=args.steps,
    )  # fmt: skip
    s, gap = 2 * digits.SIZE, 4
    out = Image.new("RGB", (args.per_class * (s + gap) + gap, len(CLASSES) * (s + gap) + gap), (128, 128, 128))
    for c in CLASSES:
        for k, im in enumerate(images[labels == c]):
            out.paste(Image.fromarray(im).resize((s, s), Image.NEAREST), (gap + k * (s + gap), gap + c * (s + gap)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out.save(args.out)
    predicted = digits.load_judge().predict(images)
    print(f"grid -> {args.out} (judge accuracy on these {len(images)}: {(predicted == labels).mean():.3f})")
    return args.out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("tokenizer", help="PSNR + judge accuracy on reconstructions of digits:test")
    p.add_argument("--tokenizer", type=Path, default=digits.SHIPPED / "tokenizer")
    for name, helptext in (("generator", "judge a generator folder"), ("samplers", "SDE 250 vs Heun 8/16/32")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", type=Path, default=digits.SHIPPED)
        p.add_argument("--num-per-class", type=int, default=50)
        p.add_argument("--cfg", type=float, default=1.5)
        p.add_argument("--sampler", default="heun")
        p.add_argument("--steps", type=int, default=16)
        p.add_argument("--layout-cfg", type=float, default=1.0, help="guidance scale of the layout stage (default 1.0)")
        p.add_argument("--report", type=Path)
    p = sub.add_parser("curve", help="judge metrics vs training steps, two-stage vs one-stage, + plot")
    for flag in ("--tokenizer", "--layout", "--texture", "--one-stage"):
        p.add_argument(flag, type=Path, required=True)
    p.add_argument("--num-per-class", type=int, default=20)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--sampler", default="heun")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="EMA or raw weights of each checkpoint")
    p.add_argument("--at", type=int, nargs="+", help="only these checkpoint steps (default: every common one)")
    p.add_argument("--layout-cfg", type=float, default=1.0, help="guidance scale of the layout stage (default 1.0)")
    p.add_argument("--guidance-low", type=float, default=0.2, help="CFG from this t on (default 0.2, official; the shipped demo uses 0)")
    p.add_argument("--layout-steps", type=int, default=5, help="layout Heun steps (default 5, official; the shipped demo uses 10)")
    p.add_argument("--report", type=Path, default=FIGURES / "digits_curve.json")
    p.add_argument("--plot", type=Path, default=FIGURES / "digits_curve.png")
    p = sub.add_parser("grid", help="generated digits, one row per class")
    p.add_argument("--model", type=Path, default=digits.SHIPPED)
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--sampler", default="heun")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=FIGURES / "digits_grid.png")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.command == "tokenizer":
        print(json.dumps(tokenizer_report(args.tokenizer), indent=1))
    elif args.command == "generator":
        r = judged(GPSGenerator.from_pretrained(args.model), args.num_per_class, cfg_scale=args.cfg, sampler=args.sampler,
                   texture_steps=args.steps, layout_cfg_scale=args.layout_cfg)
        print(json.dumps(r, indent=1))
        if args.report:
            args.report.write_text(json.dumps(r, indent=1))
    elif args.command == "curve":
        curve(args)
    elif args.command == "samplers":
        samplers(args)
    else:
        grid(args)


if __name__ == "__main__":
    main()
