import torch, time, moerust
from moerust import ops
import sys
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
layers = [torch.nn.Linear(512, 2048) if i % 2 == 0 else torch.nn.Linear(2048, 512) for i in range(10)]
params = list(torch.nn.Sequential(*layers).parameters())
grads = [torch.randn_like(p) for p in params]
for mode, wd in [("lars", 0.01), ("lars", 0.0), ("bidirectional", 0.0)]:
    res = {}
    for be in ["rust", "torch"]:
        ts = []
        with moerust.use_backend(be):
            for r in range(12):
                for p, g in zip(params, grads):
                    p.grad = g.clone()
                t0 = time.perf_counter(); ops.lars_(params, mode=mode, weight_decay=wd, eta=0.02); ts.append(time.perf_counter() - t0)
        ts.sort(); res[be] = ts[len(ts)//2] * 1e3
    print(mode, wd, {k: round(v, 2) for k, v in res.items()}, "torch/rust %.2f" % (res["torch"] / res["rust"]))
