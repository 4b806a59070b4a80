"""LogCompletionsCallback: JSONL always; a TensorBoard text table and a wandb Table when those
loggers are enabled."""
import json
import sys
import types

import pytest
from datasets import Dataset

from tiny_models import make_tokenizer, single_thread, tiny_causal_lm  # noqa: F401


def _trainer(tmp_path, **kw):
    from nashkern import NashMDConfig, NashMDTrainer

    args = NashMDConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2,
                        max_new_tokens=4, logging_steps=1, save_strategy="no", use_cpu=True,
                        disable_tqdm=True, seed=0, **kw)
    return NashMDTrainer(model=tiny_causal_lm(), args=args, processing_class=make_tokenizer(),
                         reward_funcs=lambda prompts, completions, **k: [float(len(c))
                                                                          for c in completions],
                         train_dataset=Dataset.from_dict({"prompt": ["ab", "cd", "ef", "gh"]}))


def test_tensorboard_gets_a_completions_table_per_logging_step(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (make install adds it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nashkern import LogCompletionsCallback

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    tr = _trainer(tmp_path, report_to=["tensorboard"])
    tr.add_callback(LogCompletionsCallback(tr, num_prompts=2))
    tr.train()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0}).Reload()
    events = acc.Tensors("completions/text_summary")
    assert [e.step for e in events] == [1, 2]
    table = events[-1].tensor_proto.string_val[0].decode()
    assert table.startswith("| step | prompt | policy | mixture | probability |")
    assert len(table.splitlines()) == 2 + 2  # header, rule, num_prompts rows
    rows = [json.loads(line) for line in open(tmp_path / "completions.jsonl")]
    assert rows[-1]["policy"].replace("|", "\\|").replace("\n", "<br>") in table


def test_wandb_gets_a_growing_table(tmp_path, monkeypatch):
    """A stand-in ``wandb`` module records what the callback logs (no wandb account/network)."""
    from nashkern import LogCompletionsCallback

    logged = []

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    fake = types.SimpleNamespace(run=object(), Table=Table, log=logged.append)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tr = _trainer(tmp_path, report_to="none")
    tr.args.report_to = ["wandb"]  # the callback's switch; transformers' own WandbCallback is off
    tr.add_callback(LogCompletionsCallback(tr, num_prompts=2))
    tr.train()
    assert [len(d["completions"].data) for d in logged] == [2, 4]  # the whole history each time
    table = logged[-1]["completions"]
    assert table.columns[:4] == ["step", "prompt", "policy", "mixture"]
    assert [r[0] for r in table.data] == [1, 1, 2, 2]
    fake.run = None  # no active run: nothing logged, no error
    tr2 = _trainer(tmp_path / "b", report_to="none")
    tr2.args.report_to = ["wandb"]
    tr2.add_callback(LogCompletionsCallback(tr2, num_prompts=2))
    tr2.train()
    assert len(logged) == 2
