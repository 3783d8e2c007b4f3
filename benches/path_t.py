import torch, time, sys, moerust
from moerust import ops
torch.set_num_threads(int(sys.argv[1]))
import os; t, e, k, d = int(os.environ.get("T", 8192)), 8, 2, 64
logits = torch.randn(t, e, requires_grad=True)
x = torch.randn(t, d, requires_grad=True)
up = torch.randn(t, d)
def step():
    x.grad = None; logits.grad = None
    probs = torch.softmax(logits, dim=-1)
    idx = ops.topk_route(probs, k)
    plan = ops.dispatch_plan(idx, e)
    y = ops.combine(ops.gather(x, plan), probs.gather(1, idx), plan)
    y.backward(up)
    return y.detach(), x.grad.clone(), logits.grad.clone()
res = {}
for be in ["rust", "torch"]:
    with moerust.use_backend(be):
        for _ in range(5): step()
        ts = []
        for _ in range(60):
            t0 = time.perf_counter(); step(); ts.append(time.perf_counter() - t0)
        ts.sort(); res[be] = ts[30] * 1e3
print(res, "ratio %.2f" % (res["torch"] / res["rust"]))
if len(sys.argv) > 2:
    from torch.profiler import profile
    with moerust.use_backend("rust"):
        with profile() as prof:
            for _ in range(20): step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
