import torch, time, sys, moerust
from moerust import ops
torch.set_num_threads(int(sys.argv[1]))
t, k, d, e = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), 8
torch.manual_seed(0)
probs = torch.softmax(torch.randn(t, e), -1)
idx = ops.topk_route(probs, k); plan = ops.dispatch_plan(idx, e)
x = torch.randn(t, d, requires_grad=True); w = probs.gather(1, idx).requires_grad_(); up = torch.randn(t, d)
def tm(f, n=200):
    for _ in range(10): f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    ts.sort(); return round(ts[n // 2] * 1e6, 1), round(ts[n // 10] * 1e6, 1)
for be in ["rust", "torch"]:
    with moerust.use_backend(be):
        xs = ops.gather(x.detach(), plan)
        def step():
            x.grad = None; w.grad = None
            y = ops.combine(ops.gather(x, plan), w, plan); y.backward(up)
        print(be, "step", tm(step), "gather", tm(lambda: ops.gather(x.detach(), plan)), "combine", tm(lambda: ops.combine(xs, w.detach(), plan)),
              "empty", tm(lambda: x.new_empty(t * k, d)))
