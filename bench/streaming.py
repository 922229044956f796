"""In memory or streamed: training throughput and peak memory of `fit` on the same image folder.

Writes a folder of PNG images (default 10,000 of 96x96, 276 MB decoded; JPEG CIFAR-10 images upscaled when a local
copy is found, else synthetic ones), then trains the small CNN with the supervised method for a number of steps,
once with the images decoded in memory and once streamed (`LazyImages`, decoded per step by DataLoader workers).
Each mode runs in its own process, so that its peak memory is its own: VmHWM of the training process (the high-water
mark of its resident memory, which Linux resets at exec, unlike ru_maxrss). A streaming worker holds at most its
prefetched batches (4 steps of decoded images).

    python bench/streaming.py [--images 10000] [--size 96] [--steps 150] [--workers 2]
"""
import argparse, json, subprocess, sys, tempfile, time
from pathlib import Path

def make_folder(root: Path, n: int, size: int) -> str:
    import numpy as np, torch
    from PIL import Image
    sys.path.insert(0, str(Path(__file__).parent))
    from common import cifar_or_synthetic
    data, source = cifar_or_synthetic(n)
    up = torch.nn.functional.interpolate(data.images.float(), size=size, mode="bilinear", align_corners=False)
    up = up.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, (img, y) in enumerate(zip(up, data.labels.tolist())):
        d = root / "train" / f"c{y}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.png")
    return source

def one_mode(root: str, stream: bool, steps: int, workers: int) -> dict:
    "Run in a child process: load, train, report."
    import torch
    from ssl_book.data import given_split, load_folder
    from ssl_book.models import build_model
    from ssl_book.train import FitConfig, Supervised, fit
    torch.manual_seed(0)
    t = time.perf_counter()
    train, test = load_folder(root, stream=stream, test_fraction=0.05)
    if stream: train.images.workers = workers
    load_s = time.perf_counter() - t
    cfg = FitConfig(steps=steps, batch_size=64, eval_every=steps, precision="auto")
    method = Supervised(build_model("cnn", 3, train.n_classes, width=32))
    t = time.perf_counter()
    fit(method, train, given_split(train), cfg, None, progress=False)
    train_s = time.perf_counter() - t
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
    return {"stream": stream, "load_s": load_s, "train_s": train_s, "img_per_s": steps * 64 / train_s, "peak_mb": hwm,
            "n": len(train)}

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10000); p.add_argument("--size", type=int, default=96)
    p.add_argument("--steps", type=int, default=150); p.add_argument("--workers", type=int, default=2)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        root, stream = a.child.split("|")
        print(json.dumps(one_mode(root, stream == "1", a.steps, a.workers)))
        return
    with tempfile.TemporaryDirectory() as d:
        source = make_folder(Path(d), a.images, a.size)
        mb = a.images * 3 * a.size * a.size / 2**20
        print(f"{a.images:,} PNG images of {a.size}x{a.size} from {source} ({mb:,.0f} MB decoded); "
              f"small CNN, batch 64, {a.steps} steps, {a.workers} DataLoader workers when streaming")
        rows = []
        for stream in (False, True):
            env_cache = {"SSL_BOOK_CACHE": str(Path(d) / "cache")}      # a cold cache: the first load decodes
            import os
            out = subprocess.run([sys.executable, __file__, "--child", f"{d}|{int(stream)}", "--steps", str(a.steps),
                                  "--workers", str(a.workers)], capture_output=True, text=True,
                                 env={**os.environ, **env_cache}, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{'mode':<10}{'load (s)':>10}{'train img/s':>13}{'peak memory, VmHWM (MB)':>25}")
        for r in rows:
            print(f"{'streamed' if r['stream'] else 'in memory':<10}{r['load_s']:>10.1f}{r['img_per_s']:>13.0f}{r['peak_mb']:>25.0f}")
        print(f"streamed / in memory: {rows[1]['img_per_s'] / rows[0]['img_per_s']:.2f}x the throughput, "
              f"{rows[1]['peak_mb'] / rows[0]['peak_mb']:.2f}x the main process's peak memory")

if __name__ == "__main__":
    main()
