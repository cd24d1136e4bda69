"""`python -m minicpmv.cli.demo OUT` (`make demo`): the whole chain on a fresh machine, in seconds.

1. a tiny synthetic MiniCPM-V 4.5 checkpoint (real file layout and tokenizer format, random weights);
2. `minicpm-convert` -> Q4_K_M language model + f16 mmproj GGUF files;
3. a generated picture;
4. `minicpm-run` on it, printing the (meaningless: the weights are random) answer and the timings.

Each tool runs as its own process, exactly as a user would call it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def make_picture(path: Path) -> Path:
    """An 800x600 drawing (sky, sun, house): sliced by the runtime into a 2x2 grid + overview."""
    w, h = 800, 600
    y = np.linspace(0, 1, h)[:, None, None]
    sky = (np.array([90, 150, 230]) * (1 - y) + np.array([200, 230, 255]) * y).astype(np.uint8)
    img = Image.fromarray(np.broadcast_to(sky, (h, w, 3)).copy())
    d = ImageDraw.Draw(img)
    d.rectangle([0, 450, w, h], fill=(70, 160, 60))
    d.ellipse([620, 60, 720, 160], fill=(255, 210, 40))
    d.rectangle([250, 300, 450, 470], fill=(180, 90, 60))
    d.polygon([(230, 300), (350, 200), (470, 300)], fill=(120, 40, 40))
    d.rectangle([330, 390, 370, 470], fill=(90, 50, 20))
    img.save(path)
    return path


def step(title: str, cmd: list[str]) -> None:
    print(f"\n== {title}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        print(f"demo: step failed with exit code {rc}: {title}", file=sys.stderr)
        raise SystemExit(rc)
    print(f"({time.perf_counter() - t0:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0].strip("`"))
        return 0 if args and args[0] in ("-h", "--help") else 2
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    ckpt, gguf_dir = out / "checkpoint", out / "gguf"
    if (ckpt / "config.json").is_file():  # a previous demo run: start over
        shutil.rmtree(ckpt)
    step("1/3 tiny synthetic checkpoint", [py, "-m", "minicpmv.convert.synthetic", "--scale", "tiny", str(ckpt)])
    step(
        "2/3 minicpm-convert",
        [
            py,
            "-m",
            "minicpmv.cli.convert",
            str(ckpt),
            "-o",
            str(gguf_dir),
            "--quant",
            "Q4_K_M",
            "--mmproj-type",
            "f16",
            "--force",
            "--quiet",
        ],
    )
    pic = make_picture(out / "picture.png")
    print(f"\n(picture: {pic}, 800x600)")
    step(
        "3/3 minicpm-run",
        [
            py,
            "-m",
            "minicpmv.cli.run",
            "--model-dir",
            str(gguf_dir),
            str(pic),
            "What is in the image?",
            "--max-tokens",
            "48",
            "--seed",
            "0",
            "--verbose",
        ],
    )
    print("\nThe weights are random, so the answer is noise; every stage ran for real.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
