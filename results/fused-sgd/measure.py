"""torch.optim.SGD(fused=True) against the per-tensor SGD on the CPU: 20 steps of lr 0.01, momentum 0.9 on
tensors of several sizes from the same start and gradients; prints whether the results agree bit for bit."""

import torch

print(torch.__version__)
for size in (7, 16, 20, 1000, 1003):
    g = torch.Generator().manual_seed(size)
    start, grads = torch.randn(size, generator=g), torch.randn(20, size, generator=g)
    results = []
    for fused in (False, True):
        p = torch.nn.Parameter(start.clone())
        opt = torch.optim.SGD(
            [p], lr=0.01, momentum=0.9, fused=fused, foreach=False if not fused else None
        )
        for grad in grads:
            p.grad = grad.clone()
            opt.step()
        results.append(p.detach())
    differ = int((results[0] != results[1]).sum())
    print(f"size {size}: {'bit for bit' if differ == 0 else f'{differ} elements differ'}")
