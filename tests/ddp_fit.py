"""Run by tests/test_distributed.py, alone or under torchrun: `fit` on synthetic data, and process 0 writes the logged
losses. `mlp`: no BatchNorm, dropout or augmentation, so that N processes must reproduce one exactly; `cnn`: FixMatch
with the book's CNN (BatchNorm, augmentation, an unlabeled batch, EMA and a checkpoint), which must just run."""
import atexit, json, os, sys
import torch, torch.nn as nn
from ssl_book.data import make_synthetic, split
from ssl_book.train import FitConfig, Supervised, distributed, fit

def _report_exit():
    "Registered before `distributed()`, so it runs after the exit handler that registers (last in, first out)."
    left = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    with open(f"{sys.argv[1]}.left{os.environ.get('RANK', '0')}", "w") as f: f.write(str(left))
atexit.register(_report_exit)
rank, world = distributed()
train = make_synthetic(n_per_class=32, n_classes=4, size=8, seed=0)
s = split(train.labels, 64, seed=0)
out, kind = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
if kind == "mlp":
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 32), nn.ReLU(), nn.Linear(32, 4))
    cfg = FitConfig(steps=30, batch_size=16, lr=0.1, eval_every=1, flip=False, pad_frac=0.0, precision="fp32")
    h = fit(Supervised(model), train, s, cfg, progress=False, device="cpu")
else:
    from ssl_book.consistency import FixMatch
    from ssl_book.models import small_cnn
    cfg = FitConfig(steps=6, batch_size=8, mu=2, eval_every=3, ema_decay=0.9, precision="fp32")
    h = fit(FixMatch(small_cnn(3, 4, 8)), train, split(train.labels, 16, seed=0), cfg, train, progress=False,
            device="cpu", checkpoint=out + ".pt")
if rank == 0: json.dump({"world": world, "loss": h["loss"], "test_acc": h["test_acc"]}, open(out, "w"))
if kind == "mlp" and torch.distributed.is_initialized():   # leaving by hand: distributed()'s exit handler must cope
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
# cnn: left to distributed()'s exit handler
