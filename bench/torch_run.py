"""Trains one benchmark job with PyTorch; prints one JSON line per epoch (like dtrain's --log-format json).

    torch_run.py JOB EPOCHS THREADS                      one process
    torch_run.py JOB EPOCHS THREADS RANK WORLD PORT      DDP over gloo (rank 0 prints)

The same model, regularization, optimizer and batch as examples/JOB.toml (see bench/keras_models.py):
Flatten, Dense with L2 kernel and L1 activity penalties and MaxNorm, Dropout, softmax crossentropy,
Adam. Each epoch is a shuffled pass over the 60,000 training samples in batches (with DDP each rank
takes its half of every global batch, so the update is the same global-batch update), then an
evaluation of the 10,000 test samples, and the weights are kept when val_loss improves, as dtrain's
ModelCheckpoint(save_best_only) does. "seconds" covers all three, as dtrain's epoch time does.
"""
import io
import json
import sys
import time

import torch
import torch.nn.functional as F

from keras_models import data

JOBS = {
    # layers: (units, activation, l2 kernel penalty, l1 activity penalty, max norm, dropout after)
    "fashion_mnist": dict(layers=[(64, None, 0.01, 0.01, 2.0, 0.5), (10, "softmax", 0, 0, None, 0)],
                          batch=30, lr=1e-3, beta_1=0.89),
    "fashion_mnist_wide": dict(layers=[(512, "relu", 1e-4, 0, None, 0.2), (512, "relu", 1e-4, 0, None, 0.2),
                                       (10, "softmax", 0, 0, None, 0)],
                               batch=256, lr=1e-3, beta_1=0.9),
}


class Net(torch.nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        dims = [784] + [u for u, *_ in spec]
        self.dense = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(dims, dims[1:]))

    def forward(self, x):
        """Logits of the last layer and the activity penalties' sum over the rows."""
        activity = x.new_zeros(())
        h = x.flatten(1)
        for layer, (_, act, _, l1, _, rate) in zip(self.dense, self.spec):
            h = layer(h)
            if act == "relu":
                h = F.relu(h)
            if l1:
                activity = activity + l1 * h.abs().sum()
            if rate:
                h = F.dropout(h, rate, self.training)
        return h, activity

    def weight_penalty(self):
        return sum(l2 * layer.weight.square().sum() for layer, (_, _, l2, *_) in zip(self.dense, self.spec) if l2)

    @torch.no_grad()
    def constrain(self):
        for layer, (_, _, _, _, max_norm, _) in zip(self.dense, self.spec):
            if max_norm:
                w = layer.weight  # [units, inputs]: a row is one unit's incoming weights
                n = w.norm(dim=1, keepdim=True)
                w.mul_(n.clamp(max=max_norm) / (1e-7 + n))


def main():
    job, epochs, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ddp = len(sys.argv) > 4
    rank, world = (int(sys.argv[4]), int(sys.argv[5])) if ddp else (0, 1)
    torch.set_num_threads(threads)
    torch.manual_seed(42)
    spec = JOBS[job]
    x, y, xt, yt = (torch.from_numpy(a.copy()) for a in data())
    y, yt = y.long(), yt.long()
    model = Net(spec["layers"])
    if ddp:
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[6]}", rank=rank, world_size=world)
        net = torch.nn.parallel.DistributedDataParallel(model)
    else:
        net = model
    opt = torch.optim.Adam(model.parameters(), lr=spec["lr"], betas=(spec["beta_1"], 0.999), eps=1e-7)
    batch = spec["batch"]
    local = batch // world
    gen = torch.Generator().manual_seed(42)
    best = float("inf")
    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        loss_sum, steps = 0.0, 0
        for start in range(0, len(x) - batch + 1, batch):
            idx = perm[start + rank * local:start + (rank + 1) * local]
            logits, activity = net(x[idx])
            loss = F.cross_entropy(logits, y[idx]) + activity / local + model.weight_penalty()
            opt.zero_grad(set_to_none=False)
            loss.backward()
            opt.step()
            model.constrain()
            loss_sum += loss.item()
            steps += 1
        model.eval()
        with torch.no_grad():
            part = slice(rank * len(xt) // world, (rank + 1) * len(xt) // world)
            logits, _ = model(xt[part])
            val = torch.stack([F.cross_entropy(logits, yt[part], reduction="sum"),
                               (logits.argmax(1) == yt[part]).sum().float()])
            if ddp:
                dist.all_reduce(val)
            val_loss, val_acc = (val / len(xt)).tolist()
        if rank == 0 and val_loss < best:
            best = val_loss
            torch.save(model.state_dict(), io.BytesIO())
        if rank == 0:
            print(json.dumps({"event": "epoch_end", "epoch": epoch + 1, "seconds": time.perf_counter() - t0,
                              "steps": steps, "loss": loss_sum / steps, "val_loss": val_loss,
                              "val_accuracy": val_acc}), flush=True)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
