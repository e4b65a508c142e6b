"""main.py with torch._fused_sgd_ swapped for torch.optim.SGD's per-tensor arithmetic, for a check only
(it ignores found_inf, so it asserts that no step was bad). Shows that the fused kernel's rounding is
the only difference from commit 5a8228c (docs/speed.md):

    OMP_NUM_THREADS=1 python results/step/emulated_sgd_main.py --epochs 2 --train-samples 700 --out /tmp/cmp/emul
"""

import runpy
import sys

import torch


def per_tensor_sgd(params, grads, buffers, *, weight_decay, momentum, lr, dampening, nesterov, maximize, is_first_step, found_inf=None):
    assert not bool(found_inf) and not nesterov and not maximize
    with torch.no_grad():
        for i, p in enumerate(params):
            g = grads[i]
            if weight_decay:
                g = g.add(p, alpha=weight_decay)
            if momentum:
                buffers[i].mul_(momentum).add_(g, alpha=1 - dampening)
                g = buffers[i]
            p.add_(g, alpha=-lr)


torch._fused_sgd_ = per_tensor_sgd
sys.argv = ["main.py", *sys.argv[1:]]
sys.path.insert(0, ".")
runpy.run_path("main.py", run_name="__main__")
