"""NashEMATrainer under DDP and FSDP2 (`accelerate launch`, 2 CPU processes, gloo; one launch for
both engines, tests/rl/nash_ema_worker.py) against one process on the same data: two steps (the
second one's opponent is the average θ̄_1, not the policy), the same logged loss and metrics,
the same average (gathered from the ranks' shards), which FSDP2 holds sharded (each rank about
half of it) and DDP replicated. Tolerances: those of tests/rl/test_sharded.py (float32, different
reduction order)."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from test_sharded import _launch  # noqa: E402

ENGINES = ("ddp", "fsdp2")
KEYS = ("loss", "loss/kl", "loss/score", "logps/chosen", "logps/rejected",
        "rewards/probabilities", "rewards/chosen", "rewards/rejected")


def test_nash_ema_ddp_and_fsdp2_match_one_process(tmp_path):
    from nash_ema_worker import STEPS, make_trainer

    one = make_trainer(None, str(tmp_path / "one"), per_device_train_batch_size=4, **STEPS)
    one.train()
    base_logs = [h for h in one.state.log_history if "loss/kl" in h]
    base_ema = dict(zip(one.ema.names, one.ema.shadow))
    assert one.ema.num_updates == 2
    _launch(",".join(ENGINES), tmp_path, worker="nash_ema_worker.py")
    for engine in ENGINES:
        res = json.loads((tmp_path / f"result_{engine}.json").read_text())
        assert res["world"] == 2 and res["engine"] == engine
        assert len(res["logs"]) == 2
        for got, want in zip(res["logs"], base_logs):
            for k in KEYS:
                assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), (engine, k)
        ema = torch.load(tmp_path / f"ema_{engine}.pt")
        assert ema.keys() == base_ema.keys()
        for k, v in base_ema.items():
            torch.testing.assert_close(ema[k], v, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{engine} {k}: {m}")
        if engine == "fsdp2":
            assert res["ema_local_numel"] < 0.6 * res["full_numel"]
        else:
            assert res["ema_local_numel"] == res["full_numel"]
    # the second step's opponent was the average, not the policy: θ̄_2 ≠ θ_2
    params = dict(one.model.named_parameters())
    assert max(float((v - params[k].detach()).abs().max()) for k, v in base_ema.items()) > 1e-3
