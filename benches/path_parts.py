import torch, time, sys, moerust
from moerust import ops
torch.set_num_threads(int(sys.argv[1]))
import os; t, e, k, d = int(os.environ.get("T", 8192)), 8, 2, 64
logits = torch.randn(t, e, requires_grad=True)
x = torch.randn(t, d, requires_grad=True)
up = torch.randn(t, d)
def tm(f, n=80):
    for _ in range(5): f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    ts.sort(); return ts[n // 2] * 1e6
for be in ["rust", "torch"]:
  with moerust.use_backend(be):
    probs = torch.softmax(logits, -1)
    pd = probs.detach()
    idx = ops.topk_route(pd, k); plan = ops.dispatch_plan(idx, e)
    xs = ops.gather(x.detach(), plan); w = pd.gather(1, idx)
    xs_r = xs.clone().requires_grad_(); w_r = w.clone().requires_grad_()
    y = ops.combine(xs_r, w_r, plan)
    print(be, {
     "softmax": tm(lambda: torch.softmax(logits, -1)),
     "softmax_fwbw": tm(lambda: torch.softmax(logits, -1).backward(torch.ones(t, e))),
     "topk": tm(lambda: ops.topk_route(pd, k)),
     "plan": tm(lambda: ops.dispatch_plan(idx, e)),
     "gather": tm(lambda: ops.gather(x.detach(), plan)),
     "combine": tm(lambda: ops.combine(xs, w, plan)),
     "gather_fwbw": tm(lambda: ops.gather(x, plan).backward(xs)),
     "combine_fwbw": tm(lambda: ops.combine(xs_r, w_r, plan).backward(up)),
     "pgather": tm(lambda: pd.gather(1, idx)),
    })
