"""The batched gradient checks (one4d_train.train.grad_checks) against DeepSpeed's own per-tensor ones, on a real
ZeRO-2 bf16 engine (CPU, gloo, one process): same skipped steps, same norms, same weights, and in the common
finite case without DeepSpeed's per-tensor non-finite check. Runs in its own process (a process group)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.launch_utils import ROOT, _env, _port

N_LAYERS = 40  # many small trainable tensors, as LoRA has


def _engine(seed: int):
    import deepspeed
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(N_LAYERS)])
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
              "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
              "bf16": {"enabled": True}, "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True,
              "steps_per_print": 1 << 30}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer, config=config,
                                      dist_init_required=False)
    return engine


def _run(engine, poison: dict[int, float]) -> dict:
    """Steps whose gradient is scaled by poison[step] (NaN, inf, huge) in one layer; per step: applied, norm."""
    import torch
    out = {"applied": [], "norms": []}
    for step in range(6):
        x = torch.ones(1, 8, dtype=torch.bfloat16) * (step + 1) / 8
        y = engine(x)
        scale = poison.get(step)
        loss = y.float().pow(2).sum()
        if scale is not None:  # one layer's weight gradient only
            loss = loss + (engine.module[N_LAYERS // 2].weight.float().sum() * scale)
        engine.backward(loss)
        engine.step()
        out["applied"].append(bool(engine.was_step_applied()))
        norm = engine.get_global_grad_norm()
        out["norms"].append(None if norm is None else float(norm))
    out["weights"] = [p.detach().float().flatten().tolist() for p in engine.optimizer.bit16_groups[0]]
    return out


def _compare() -> dict:
    import deepspeed
    import deepspeed.runtime.zero.stage_1_and_2 as stage2
    from one4d_train.train import grad_checks

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    poison = {1: float("nan"), 3: float("inf"), 4: 1e30, 5: 1e18}
    calls = {"n": 0}
    per_tensor = stage2.has_inf_or_nan

    def counted(x):
        calls["n"] += 1
        return per_tensor(x)

    stage2.has_inf_or_nan = counted
    theirs = _run(_engine(0), poison)
    their_calls, calls["n"] = calls["n"], 0
    assert grad_checks.install()
    ours = _run(_engine(0), poison)
    clean = _run(_engine(1), {})
    grad_checks.uninstall()
    return {"theirs": theirs, "ours": ours, "their_calls": their_calls, "our_calls": calls["n"], "clean": clean}


def test_batched_checks_match_deepspeed_per_tensor_checks(tmp_path):
    env = _env({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(_port())})
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    theirs, ours = r["theirs"], r["ours"]
    # NaN and inf gradients skip their steps, so does 1e30 (DeepSpeed sums the squares in fp32: inf); 1e18 is clipped
    assert theirs["applied"] == [True, False, True, False, False, True]
    assert ours["applied"] == theirs["applied"]
    for a, b in zip(ours["norms"], theirs["norms"]):
        assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, rel=1e-6))
    for a, b in zip(ours["weights"], theirs["weights"]):
        assert a == pytest.approx(b, rel=1e-2, abs=1e-3)  # bf16 module copies of the fp32 masters
    # DeepSpeed checks each tensor every step (2 per layer); ours only on the two steps with non-finite values
    assert r["their_calls"] >= 6 * 2 * N_LAYERS
    assert r["our_calls"] <= 2 * (2 * N_LAYERS)
    assert r["clean"]["applied"] == [True] * 6


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    print(json.dumps(_compare()))
