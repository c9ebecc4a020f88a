"""fp32 matmuls on CPU: torch's `F.linear` (MKL's sgemm in torch's CPU wheels) beside oneDNN's product, which the
trainers use for a frozen base where this CPU runs it faster (`rlhf_ext/cpu_linear.py`).

    python benchmarks/cpu_linear.py                   # SmolLM2-135M's layer shapes, 8 and 424 rows
    python benchmarks/cpu_linear.py --rows 1,8,64,424,1024 --repeat 9

For each row count: the forward over one decoder layer's weights (q, k, v, o, gate, up, down) and over the LM head,
and the input-gradient product of the layer (dX = dY·W, what the backward of a frozen layer computes), each in
milliseconds (median of --repeat after a warm-up) with torch and with oneDNN, their ratio, the largest error of each
against float64, and what `rlhf_ext.cpu_linear.calibrate()` decides on this machine.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import _common  # noqa: F401  (offline env, flush denormals)
from ppo_floor import timed  # median seconds after a warm-up
from rlhf_ext.cpu_linear import calibrate, machine_key, onednn_product


def layer_weights(hidden: int, kv: int, inter: int, g: torch.Generator) -> list[torch.Tensor]:
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
              (hidden, inter)]
    return [torch.randn(o, i, generator=g) / i ** 0.5 for o, i in shapes]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="8,424", help="token rows per product: a decoding step's batch, a pass's rows")
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--kv", type=int, default=192, help="key/value projection width (grouped-query attention)")
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    layer = layer_weights(a.hidden, a.kv, a.intermediate, g)
    head = torch.randn(a.vocab, a.hidden, generator=g) / a.hidden ** 0.5
    print(f"{machine_key()}\noneDNN faster by calibration: {calibrate()}")
    print(f"{'rows':>5} {'product':<24} {'torch ms':>9} {'oneDNN ms':>10} {'speed-up':>9} {'err torch':>10} "
          f"{'err oneDNN':>10}")
    with torch.no_grad():
        for rows in map(int, a.rows.split(",")):
            x = {w.shape[1]: torch.randn(rows, w.shape[1], generator=g) for w in layer}
            dy = {w.shape[0]: torch.randn(rows, w.shape[0], generator=g) for w in layer}
            cases = {
                "layer forward": ([lambda w=w: F.linear(x[w.shape[1]], w) for w in layer],
                                  [lambda w=w: onednn_product(x[w.shape[1]], w) for w in layer],
                                  lambda w: x[w.shape[1]].double() @ w.double().t()),
                "layer input gradient": ([lambda w=w: torch.mm(dy[w.shape[0]], w) for w in layer],
                                         [lambda w=w: onednn_product(dy[w.shape[0]], w.t()) for w in layer],
                                         lambda w: dy[w.shape[0]].double() @ w.double()),
                "LM head forward": ([lambda: F.linear(x[a.hidden], head)], [lambda: onednn_product(x[a.hidden], head)],
                                    None),
            }
            for name, (theirs, ours, exact) in cases.items():
                t_theirs = timed(lambda: [f() for f in theirs], a.repeat)
                t_ours = timed(lambda: [f() for f in ours], a.repeat)
                errs = ("", "")
                if exact is not None:
                    ws = layer
                    e_t = max(float((f().double() - exact(w)).abs().max()) for f, w in zip(theirs, ws))
                    e_o = max(float((f().double() - exact(w)).abs().max()) for f, w in zip(ours, ws))
                    errs = (f"{e_t:.2e}", f"{e_o:.2e}")
                print(f"{rows:5d} {name:<24} {t_theirs * 1e3:9.3f} {t_ours * 1e3:10.3f} {t_theirs / t_ours:8.2f}× "
                      f"{errs[0]:>10} {errs[1]:>10}", flush=True)


if __name__ == "__main__":
    main()
