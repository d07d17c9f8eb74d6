"""The LoRA trainer and the sweep, on CPU, on the tiny model, with a learnable answer.

Every user question gets the same answer, so a few epochs of LoRA must lower the
validation loss and steer greedy decoding to that answer. One Ray cluster (2 CPUs)
serves the module; one trained run is shared by the tests that read its results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from training.chat_data import collate, encode_example
from training.cli import add_cli, overrides, run_cli
from training.train import TrainConfig, TrainResult, train

ANSWER = "The answer is forty-two."
QUESTIONS = [
    "What is the capital of France?", "How many tokens are in this sentence?", "Please write a short poem.",
    "Can you translate this text into French?", "Summarize the following article.", "What is six times seven?",
    "Good morning! How are you doing today?", "Is the weather nice today?", "Where does the train leave from?",
    "Why do cats and dogs fight?", "When does the library open?", "Who wrote this letter?",
]
N_TRAIN, BATCH_SIZE = 96, 8
STEPS_PER_EPOCH = N_TRAIN // BATCH_SIZE
EPOCHS = 3
# The tiny model's random lm_head caps how sharp its logits can get (loss floor ~4.7 nats):
# LoRA on lm_head too lets it learn a fixed answer in a few epochs.
TARGETS = ["q_proj", "v_proj", "lm_head"]


@dataclass(frozen=True)
class Data:
    """The tiny model and the chat files."""

    model: Path
    train_file: Path
    validation_file: Path

    def config(self, output_dir: Path, **overrides: object) -> TrainConfig:
        """A fast-learning config on this data."""
        fields = {"base_model": self.model, "train_file": self.train_file, "validation_file": self.validation_file,
                  "output_dir": output_dir, "learning_rate": 1e-2, "epochs": EPOCHS, "batch_size": BATCH_SIZE,
                  "dropout": 0.0, "target_modules": TARGETS, "report_every_steps": 20, **overrides}
        return TrainConfig.model_validate(fields)


def _rows(count: int, offset: int) -> str:
    rows = []
    for i in range(offset, offset + count):
        messages = [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"},
                    {"role": "assistant", "content": ANSWER}]
        rows.append(json.dumps({"messages": messages}))
    return "\n".join(rows) + "\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    from deployments.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("train-data")
    (root / "train.jsonl").write_text(_rows(N_TRAIN, 0), encoding="utf-8")
    (root / "val.jsonl").write_text(_rows(8, 1000), encoding="utf-8")
    return Data(make_tiny_model(root / "model"), root / "train.jsonl", root / "val.jsonl")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A fresh local cluster of this module's own, or the suite's when the integration tests started one (a
    process joins one cluster; Serve's replicas there take no CPU, so Train's workers fit beside them).

    Ray Train's preemption watcher and metrics actors are off: one process less per
    run on a 2-core machine, and neither has anything to watch here.
    """
    import ray

    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")
        env.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        env.setenv("RAY_TRAIN_METRICS_ENABLED", "0")
        if ray.is_initialized():
            assert ray.available_resources().get("CPU", 0) >= 2, ray.available_resources()
            yield
            return
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def trained(data: Data, ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """One Ray Train run (1 worker, 3 epochs), shared by the tests that read it."""
    return train(data.config(tmp_path_factory.mktemp("train-out")))


def test_training_lowers_validation_loss(trained: TrainResult, data: Data) -> None:
    assert trained.val_loss < 0.7 * trained.val_loss_before
    assert (trained.start_step, trained.steps, trained.epochs) == (0, EPOCHS * STEPS_PER_EPOCH, EPOCHS)
    assert trained.tokens_per_s > 0


def test_adapter_dir_layout(trained: TrainResult, data: Data) -> None:
    from training.registry import AdapterMetadata

    files = {p.name for p in trained.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "raygate_adapter.json"} <= files
    assert "trainer_state.pt" not in files
    metadata = json.loads((trained.adapter_dir / "raygate_adapter.json").read_text(encoding="utf-8"))
    digest = hashlib.sha256(data.train_file.read_bytes() + data.validation_file.read_bytes()).hexdigest()
    assert metadata["dataset_hash"] == digest
    assert metadata["base_model"] == str(data.model)
    assert metadata["config"]["learning_rate"] == 1e-2
    assert metadata["metrics"] == {
        "train_loss": trained.train_loss, "val_loss": trained.val_loss, "val_loss_before": trained.val_loss_before,
        "tokens_per_s": trained.tokens_per_s, "steps": trained.steps,
    }
    AdapterMetadata.model_validate(metadata)  # what the registry will read


def test_adapter_steers_generation_to_the_answer(trained: TrainResult, data: Data) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(data.model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Who painted this picture? (7)"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    target = Counter(tokenizer(ANSWER, add_special_tokens=False)["input_ids"])

    def answer_tokens(model: torch.nn.Module) -> int:
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
        return sum((Counter(out[0, prompt["input_ids"].shape[1]:].tolist()) & target).values())

    base = AutoModelForCausalLM.from_pretrained(data.model)
    base_count = answer_tokens(base)
    tuned_count = answer_tokens(PeftModel.from_pretrained(base, trained.adapter_dir))
    assert tuned_count > base_count
    assert tuned_count >= sum(target.values()) // 2


def test_resume_continues_the_step_count_on_two_workers(trained: TrainResult, data: Data, tmp_path: Path) -> None:
    # Two gloo workers with half the batch: the same global batch, so the same steps per epoch.
    config = data.config(tmp_path, epochs=EPOCHS + 1, num_workers=2, batch_size=BATCH_SIZE // 2,
                         resume_from=trained.checkpoint_path)
    resumed = train(config)
    assert resumed.start_step == trained.steps
    assert (resumed.steps, resumed.epochs) == ((EPOCHS + 1) * STEPS_PER_EPOCH, EPOCHS + 1)
    assert resumed.val_loss_before == trained.val_loss_before  # carried by the checkpoint, not re-measured
    assert resumed.val_loss < 0.7 * resumed.val_loss_before


def test_sweep_picks_the_trial_with_the_lowest_val_loss(data: Data, ray_cluster: None, tmp_path: Path) -> None:
    from training.tune import TuneConfig, sweep

    base = data.config(tmp_path, epochs=2, report_every_steps=100)
    # Trials run in grid order, one at a time: ASHA stops 1e-5 after its first epoch (far behind 1e-2),
    # and the 3e-3 trial after it must still get the CPU the stopped trial's workers held.
    config = TuneConfig(train=base, learning_rates=[1e-2, 1e-5, 3e-3], ranks=[4], grace_period=1, time_budget_s=240)
    result = sweep(config)
    trials = {t.learning_rate: t for t in result.trials}
    assert sorted(trials) == [1e-5, 3e-3, 1e-2]
    assert all(t.val_loss is not None and t.error is None for t in trials.values())
    assert (trials[1e-2].epochs, trials[1e-5].epochs, trials[3e-3].epochs) == (2, 1, 2)
    assert result.best.val_loss == min(t.val_loss for t in trials.values())
    assert result.best.learning_rate == 1e-2
    metadata = json.loads((result.best_adapter_dir / "raygate_adapter.json").read_text(encoding="utf-8"))
    assert metadata["config"]["learning_rate"] == 1e-2 and metadata["config"]["r"] == 4
    assert metadata["metrics"]["val_loss"] == result.best.val_loss


def test_labels_mask_everything_but_the_final_answer(data: Data) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(data.model)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is six times seven?"},
                {"role": "assistant", "content": ANSWER}]
    example = encode_example(tokenizer, messages, max_length=512)
    assert example is not None
    ids, labels = example["input_ids"], example["labels"]
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    n_prompt = len(tokenizer.apply_chat_template(messages[:-1], tokenize=True, return_dict=False,
                                                 add_generation_prompt=True))
    assert labels[:n_prompt] == [-100] * n_prompt  # system, user and the earlier assistant turn
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tokenizer.decode(labels[n_prompt:]) == ANSWER + "<|im_end|>\n"
    assert encode_example(tokenizer, messages, max_length=n_prompt) is None  # no answer token left

    short = encode_example(tokenizer, messages[-2:], max_length=512)
    batch = collate([example, short], pad_id=tokenizer.pad_token_id)
    pad = len(ids) - len(short["input_ids"])
    assert batch["input_ids"][1, -pad:].tolist() == [tokenizer.pad_token_id] * pad
    assert batch["attention_mask"][1].tolist() == [1] * len(short["input_ids"]) + [0] * pad
    assert batch["labels"][1].tolist() == short["labels"] + [-100] * pad


def test_config_refuses_gpu_only_options_on_cpu(data: Data, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bf16 needs use_gpu"):
        data.config(tmp_path, bf16=True)
    with pytest.raises(ValueError, match="load_in_4bit needs use_gpu"):
        data.config(tmp_path, load_in_4bit=True)
    with pytest.raises(ValueError, match="Extra inputs"):
        data.config(tmp_path, lora_rank=4)


def test_cli_reads_yaml_and_overrides(data: Data, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training import tune

    parser = argparse.ArgumentParser(prog="raygate")
    add_cli(parser.add_subparsers(dest="command", required=True))
    config_file = tmp_path / "train.yaml"
    config_file.write_text(f"base_model: {data.model}\nlearning_rate: 0.5\nepochs: 2\n", encoding="utf-8")
    args = parser.parse_args(["train", "--config", str(config_file), "--learning-rate", "0.001",
                              "--target-modules", "q_proj", "k_proj", "--no-use-gpu"])
    assert overrides(args, TrainConfig) == {"learning_rate": "0.001", "target_modules": ["q_proj", "k_proj"],
                                            "use_gpu": False}
    assert run_cli(args) == 2  # train_file, validation_file and output_dir are missing
    assert "train_file" in capsys.readouterr().err

    args = parser.parse_args(["tune", "--learning-rates", "0.1", "0.01", "--ranks", "4", "--epochs", "3"])
    assert overrides(args, tune.TuneConfig) == {"learning_rates": ["0.1", "0.01"], "ranks": ["4"]}
    assert overrides(args, TrainConfig) == {"epochs": "3"}
    assert run_cli(args) == 2  # no train: section at all


def test_cli_trains_without_ray(data: Data, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="raygate")
    add_cli(parser.add_subparsers(dest="command", required=True))
    config_file = tmp_path / "train.yaml"
    config_file.write_text(f"base_model: {data.model}\ntrain_file: {data.train_file}\n", encoding="utf-8")
    args = parser.parse_args(["train", "--config", str(config_file), "--validation-file", str(data.validation_file),
                              "--output-dir", str(tmp_path / "out"), "--learning-rate", "0.01", "--epochs", "1",
                              "--target-modules", *TARGETS, "--no-ray"])
    assert run_cli(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["steps"], printed["epochs"]) == (STEPS_PER_EPOCH, 1)
    assert printed["val_loss"] < printed["val_loss_before"]
    assert Path(printed["checkpoint_path"]).parent == tmp_path / "out" / "checkpoints"
    assert (tmp_path / "out" / "adapter" / "raygate_adapter.json").is_file()
