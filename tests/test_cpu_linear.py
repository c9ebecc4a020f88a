"""cpu_linear.py: a frozen base's fp32 matmuls through oneDNN compute F.linear to fp32 rounding (forward and input
gradient, checked against float64), only for frozen fp32 layers on CPU outside autocast, decided at each call; both
trainers install it where asked (or where the calibration measured it faster), every pass then computes one function
(KL at θ₀ exactly 0), and training moves the parameters it must as it does with torch's kernel. The speed is
measured by benchmarks/cpu_linear.py, not here."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from rlhf_ext import cpu_linear
from rlhf_ext.cpu_linear import is_routed, onednn_product, route_frozen_linears
from rlhf_ext.testing import tiny_model_for

from .test_precision import trainer

needs_onednn = pytest.mark.skipif(cpu_linear._onednn_op() is None, reason="this torch build has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 16), (8, 48), (3, 7, 32), (2, 5, 64), (40, 24), (5, 15, 32), (425, 16)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("transposed_input", [False, True])
def test_forward_and_input_gradient_are_linear_to_fp32_rounding(shape, bias, transposed_input):
    """Against float64 autograd of x·Wᵀ + b (the independent computation): the output, dX, and no gradient at all for
    the frozen W and b. Non-contiguous inputs (a transposed view) too, and row counts computed at a larger bucket
    (75 → 76 rows, 425 → 432)."""
    g = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    x = torch.randn(*shape[:-1], shape[-1], generator=g)
    if transposed_input:
        x = torch.randn(shape[-1], *shape[:-1], generator=g).movedim(0, -1)
    layer = torch.nn.Linear(shape[-1], 24, bias=bias).requires_grad_(False)
    route_frozen_linears(layer, "onednn")
    assert is_routed(layer)
    x64 = x.double().requires_grad_()
    exact = F.linear(x64, layer.weight.double(), None if layer.bias is None else layer.bias.double())
    dy = torch.randn(exact.shape, generator=g)
    exact.backward(dy.double())
    xr = x.clone().requires_grad_()
    y = layer(xr)
    y.backward(dy)
    assert y.shape == exact.shape and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), exact.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xr.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)


def test_row_buckets_bound_the_shapes_and_the_extra_rows():
    """Every row count is computed at a bucket ≥ it and at most 6.25 % above it (≤ 32 rows: itself); a doubling of the
    row count holds 16 buckets, so the shapes oneDNN compiles kernels for stay few however the lengths vary."""
    buckets = [cpu_linear.row_bucket(r) for r in range(1, 5000)]
    for rows, b in enumerate(buckets, 1):
        assert rows <= b <= rows * 1.0625 and (b == rows or rows > 32)
    for lo in (64, 256, 1024, 2048):
        assert len({cpu_linear.row_bucket(r) for r in range(lo + 1, 2 * lo + 1)}) == 16


@needs_onednn
def test_a_run_of_varying_lengths_compiles_few_shapes(monkeypatch):
    """60 passes of 300–418 rows (a PPO run's lengths changing with every rollout) reach oneDNN at 9 row counts."""
    seen = set()
    real = cpu_linear.onednn_product
    monkeypatch.setattr(cpu_linear, "onednn_product", lambda x, w, b=None: seen.add(x.shape) or real(x, w, b))
    layer = torch.nn.Linear(16, 8).requires_grad_(False)
    route_frozen_linears(layer, "onednn")
    for rows in range(300, 420, 2):
        x = torch.randn(rows, 16, requires_grad=True)
        layer(x).sum().backward()
        assert x.grad.shape == x.shape
    assert {shape[0] for shape in seen} == {-(-rows // 16) * 16 for rows in range(300, 420, 2)}  # 9 sizes, not 60


@needs_onednn
def test_each_call_decides_trainable_bf16_autocast_and_no_grad():
    """A routed layer whose weight trains (an adapter, a head, a fully trained model) computes torch's F.linear bit for
    bit and gets its gradient; so does any layer under autocast or with bf16 input; a frozen one without gradients
    is oneDNN's product bit for bit."""
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(32, 48)
    route_frozen_linears(layer, "onednn")
    x = torch.randn(6, 32, generator=g)
    y = layer(x)  # trainable
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias))
    y.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    layer.requires_grad_(False)
    with torch.no_grad():
        assert torch.equal(layer(x), onednn_product(x, layer.weight, layer.bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    layer.bias.requires_grad_(True)  # a trained bias alone: torch's product, which gives it its gradient
    out = layer(x)
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))
    out.sum().backward()
    assert layer.bias.grad is not None


def test_which_modules_are_routed(tok, monkeypatch):
    """Frozen plain fp32 nn.Linear modules on CPU (the base's layers; a model listed twice counted once); not LoRA's
    A/B (trained: F.linear always), not a module with its own forward (an accelerate hook), not a bf16 one. 'auto'
    follows the calibration, 'torch' routes nothing, an unknown name and 'onednn' without oneDNN are refused naming
    the choices."""
    model = get_peft_model(tiny_model_for("llama3", tok), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trained = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.requires_grad]
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]
    assert trained and linears
    hooked, half = linears[0], linears[1]
    hooked.forward = hooked_forward = lambda x: F.linear(x, hooked.weight)
    half.to(torch.bfloat16)
    monkeypatch.setattr(cpu_linear, "onednn_faster", lambda: False)
    assert route_frozen_linears(model, "auto") == 0 and route_frozen_linears(model, "torch") == 0
    assert not any(is_routed(m) for m in linears)
    monkeypatch.setattr(cpu_linear, "onednn_faster", lambda: True)
    monkeypatch.setattr(cpu_linear, "_onednn_op", lambda: object())
    assert route_frozen_linears([model, model], "auto") == len(linears) - 2
    assert [m for m in linears if not is_routed(m)] == [hooked, half] and hooked.forward is hooked_forward
    assert not any(is_routed(m) for m in trained)
    assert route_frozen_linears(model, "onednn") == len(linears) - 2  # again: the same modules, nothing stacked
    for m in linears:
        if is_routed(m):
            del m.forward
    assert route_frozen_linears(model, "onednn", torch.device("cuda", 0)) == 0  # training on a GPU: nothing
    assert not any(is_routed(m) for m in linears)
    assert route_frozen_linears(model, "onednn", torch.device("cpu")) == len(linears) - 2
    with pytest.raises(ValueError, match="'auto', 'onednn', 'torch'"):
        route_frozen_linears(model, "mkl")
    monkeypatch.setattr(cpu_linear, "_onednn_op", lambda: None)
    with pytest.raises(ValueError, match="no oneDNN.*use 'auto' or 'torch'"):
        route_frozen_linears(model, "onednn")


def test_both_configs_refuse_an_unknown_backend(tmp_path):
    from rlhf_ext import PPOConfig, RewardEnsembleConfig

    for cls in (PPOConfig, RewardEnsembleConfig):
        with pytest.raises(ValueError, match="cpu_matmul_backend must be one of 'auto', 'onednn', 'torch'"):
            cls(str(tmp_path / "o"), cpu_matmul_backend="fast")


@needs_onednn
def test_ppo_through_onednn_starts_exact_and_trains_as_torchs_kernel_does(tmp_path, tok, tiny_path):
    """Every frozen fp32 linear routed, the start-up checks pass (training and reference agree exactly at θ₀,
    sampling within the fp32 tolerance), and one iteration moves exactly the adapter's B matrices and the value
    head as torch's kernel does — each to fp32 rounding of the other backend's update."""
    moved = {}
    for backend in ("torch", "onednn"):
        tr = trainer(tmp_path / backend, tok, tiny_path, max_steps=1, cpu_matmul_backend=backend,
                     learning_rate=1e-2, num_ppo_epochs=1)
        base = [m for m in tr.policy.peft.get_base_model().modules() if type(m) is torch.nn.Linear]
        frozen = [m for m in base if not m.weight.requires_grad]
        assert all(is_routed(m) for m in frozen) == (backend == "onednn") and frozen
        assert not any(is_routed(m) for m in base if m.weight.requires_grad)  # LoRA factors: F.linear always
        assert tr.startup["cpu_matmul"] == (f"oneDNN ({len(frozen)} frozen fp32 linears)" if backend == "onednn"
                                            else "torch")  # what the model card states
        assert tr.startup["training_vs_reference"] == 0.0
        assert tr.startup["sampling_vs_training"] <= tr.startup["sampling_vs_training_tolerance"]
        before = {n: p.detach().clone() for n, p in tr.policy.named_parameters() if p.requires_grad}
        tr.train()
        moved[backend] = {n: p.detach() - before[n] for n, p in tr.policy.named_parameters() if n in before}
    torch_step, onednn_step = moved["torch"], moved["onednn"]
    assert torch_step.keys() == onednn_step.keys()
    lora_b = [n for n in torch_step if "lora_B" in n]
    assert lora_b and all(torch_step[n].abs().max() > 0 for n in lora_b)
    for n in torch_step:
        torch.testing.assert_close(onednn_step[n], torch_step[n], rtol=1e-3, atol=1e-6)


def test_a_onednn_that_cannot_run_here_calibrates_to_torchs_kernel(monkeypatch):
    """A build whose oneDNN op exists but fails on this CPU (an unsupported ISA) keeps torch's kernel instead of
    crashing the trainer's start-up."""
    def broken(*args):
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(cpu_linear, "_onednn_op", lambda: broken)
    assert cpu_linear.calibrate() is False


def test_the_calibration_is_measured_once_per_machine_and_kept(tmp_path, monkeypatch):
    """Its own entry beside decoding's, in the same file; read by the next process, measured again where the file is
    damaged."""
    monkeypatch.setenv("RLHF_EXT_CACHE", str(tmp_path))
    measured = []
    monkeypatch.setattr(cpu_linear, "calibrate", lambda: measured.append(1) or True)
    path = tmp_path / "cpu_matmul.json"
    path.write_text(json.dumps({"decoding": [2, 17]}))

    def new_process():
        cpu_linear.onednn_faster.cache_clear()
        return cpu_linear.onednn_faster()

    try:
        assert new_process() is True and len(measured) == 1
        assert json.loads(path.read_text()) == {"decoding": [2, 17], cpu_linear.machine_key() + " | onednn linear": True}
        assert new_process() is True and len(measured) == 1
        path.write_text("[")
        assert new_process() is True and len(measured) == 2
    finally:
        cpu_linear.onednn_faster.cache_clear()


@needs_onednn
@pytest.mark.parametrize("mode,checkpointing", [("heads", False), ("adapters", True)])
def test_reward_trainer_through_onednn_trains_as_torchs_kernel_does(tmp_path, tok, tiny_path, mode, checkpointing):
    """K=2 members: the frozen trunk through oneDNN (LoRA's A/B and the heads, trained, through torch's), with gradient checkpointing too (its
    recomputation runs the same routed layers); per-step losses and the trained parameters match torch's kernel's
    run to fp32 rounding, and layer 0's adapters — whose gradient crosses every routed layer above — trained."""
    from .test_gradient_checkpointing import _layer0, _reward_run

    runs = {b: _reward_run(tmp_path / b, tiny_path, tok, mode, True, checkpointing, False if checkpointing else None,
                           cpu_matmul_backend=b) for b in ("torch", "onednn")}
    (tr_t, losses_t, _, after_t), (tr_o, losses_o, before_o, after_o) = runs["torch"], runs["onednn"]
    assert tr_t.cpu_matmul == 0 and tr_o.cpu_matmul > 0
    ens = tr_o.accelerator.unwrap_model(tr_o.model)
    routed = {n for n, m in ens.named_modules() if is_routed(m)}
    assert any(n.endswith("self_attn.q_proj.base_layer") for n in routed)
    assert losses_o == pytest.approx(losses_t, abs=1e-5) and losses_o[-1] != losses_o[0]
    assert after_o.keys() == after_t.keys()
    for n in after_o:
        torch.testing.assert_close(after_o[n], after_t[n], rtol=1e-4, atol=1e-6)
    lower = _layer0(after_o)
    assert lower and all(not torch.equal(p, before_o[n]) for n, p in lower.items())


@needs_onednn
def test_the_kernel_benchmark_runs_and_prints_every_row():
    """benchmarks/cpu_linear.py at tiny widths: one row per product and row count, the errors against float64 small."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_linear.py"
    out = subprocess.run([sys.executable, str(script), "--rows", "8,40", "--hidden", "32", "--kv", "16",
                          "--intermediate", "64", "--vocab", "128", "--repeat", "1"], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    names = ("layer forward", "layer input gradient", "LM head forward")
    assert [(r.split()[0], next(n for n in reversed(names) if n in r)) for r in rows] == [
        (count, n) for count in ("8", "40") for n in names]
    errors = [float(x) for r in rows for x in r.split()[-2:] if "e-" in x]  # torch's and oneDNN's, layer rows
    assert len(errors) == 8 and max(errors) < 1e-4


def test_processes_started_together_measure_once_and_agree(tmp_path):
    """DDP's ranks on one machine start together with the same empty cache: one process measures (the others wait
    on its lock, not beside it on the CPU) and every process takes its value. Without the lock each measures and
    keeps its own — here its process id, so that a disagreement shows."""
    code = ("import os, sys, time\nfrom rlhf_ext import cpu_linear\n"
            "def measure():\n"
            "    with open(sys.argv[1], 'a') as f:\n"
            "        f.write('m')\n"
            "    time.sleep(3)\n"
            "    return os.getpid()\n"
            "print(cpu_linear.measured_once('machine', measure, int))\n")
    env = {**os.environ, "RLHF_EXT_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "calls")], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len({out.strip() for out, _ in outs}) == 1
    assert (tmp_path / "calls").read_text() == "m"
    assert json.loads((tmp_path / "cpu_matmul.json").read_text()) == {"machine": int(outs[0][0])}


def test_a_routed_model_compiles_after_training(tok):
    """A model PPO routed keeps its routed forwards after train() (installed for the trainer's life): a user who then
    compiled it got inductor's LoweringException on mkldnn._linear_pointwise. Under torch.compile the routed forward
    is F.linear, which the compiler lowers itself."""
    from rlhf_ext.cpu_linear import route_frozen_linears
    from rlhf_ext.testing import tiny_causal_lm

    model, plain = tiny_causal_lm(tok).requires_grad_(False), tiny_causal_lm(tok).requires_grad_(False)
    assert route_frozen_linears(model, "onednn") > 0
    ids = torch.tensor([[5, 6, 7, 8]])
    try:
        with torch.no_grad():
            out = torch.compile(model)(input_ids=ids).logits
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, plain(input_ids=ids).logits)


@needs_onednn
def test_under_autocast_nothing_is_routed_and_the_card_says_torch(tmp_path, tok, tiny_path):
    """bf16=True: every pass runs F.linear in bf16 (the oneDNN forward is for fp32 outside autocast), so the card's
    "CPU matmuls" line must not claim oneDNN layers that never run."""
    tr = trainer(tmp_path, tok, tiny_path, max_steps=1, cpu_matmul_backend="onednn", bf16=True)
    assert tr.startup["cpu_matmul"] == "torch"
    assert not any(is_routed(m) for m in tr.policy.peft.modules())
