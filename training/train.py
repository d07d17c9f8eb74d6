"""LoRA fine-tuning on chat JSONL: Ray Train's ``TorchTrainer``, or one plain process.

``train_loop`` is the whole training loop and runs either inside a Ray Train worker
(``prepare_model``, world rank, gloo/NCCL data parallelism) or on its own, so a bare
GPU machine without a Ray cluster can run it too; the Ray parts sit in ``Session``.
``train`` runs it on ``TorchTrainer(...).fit()`` and turns the last checkpoint into the
served adapter dir::

    <output_dir>/adapter/adapter_config.json, adapter_model.safetensors   (peft save_pretrained)
    <output_dir>/adapter/raygate_adapter.json                             (provenance, metrics)
    <output_dir>/ray_results/<run>/checkpoint_*/                          (adapter + trainer_state.pt)
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from serve_app.config_base import BaseConfig
from training.chat_data import IGNORE_INDEX, collate, encode_file
from training.registry import METADATA_FILE
from training.session import STATE_FILE, Session

if TYPE_CHECKING:
    import torch

__all__ = ["TrainConfig", "TrainResult", "checkpoint_metrics", "train", "train_loop", "write_adapter"]

logger = logging.getLogger(__name__)



class TrainConfig(BaseConfig):
    """One LoRA fine-tuning run (``raygate train``)."""

    base_model: Path = Field(description="Local dir of the base model (transformers format, with a chat template).")
    train_file: Path = Field(description='JSONL, one {"messages": [...]} per line; the last message is the answer.')
    validation_file: Path = Field(description="JSONL like train_file, for val_loss.")
    output_dir: Path = Field(description="Where checkpoints (ray_results/) and the final adapter/ go.")
    r: PositiveInt = Field(8, description="LoRA rank.")
    alpha: PositiveFloat = Field(16.0, description="LoRA alpha (the update is scaled by alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], min_length=1, description="Module names LoRA wraps."
    )
    learning_rate: PositiveFloat = Field(2e-4, description="AdamW learning rate (constant).")
    epochs: PositiveInt = Field(1, description="Passes over train_file (in all, resumed epochs included).")
    batch_size: PositiveInt = Field(8, description="Conversations per step and worker.")
    max_length: PositiveInt = Field(512, description="Tokens per conversation; longer ones are cut at the end.")
    num_workers: PositiveInt = Field(1, description="Data-parallel Ray Train workers.")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL; else CPU and gloo.")
    bf16: bool = Field(False, description="bfloat16 autocast (GPU only).")
    load_in_4bit: bool = Field(False, description="QLoRA: 4-bit base weights (GPU and bitsandbytes only).")
    seed: int = Field(0, description="Seed of the LoRA init and the data order.")
    report_every_steps: PositiveInt = Field(50, description="Report train loss every N steps (plus every epoch end).")
    resume_from: Path | None = Field(None, description="A checkpoint dir to continue from (step, epoch, optimizer).")

    @model_validator(mode="after")
    def _check_hardware(self) -> "TrainConfig":
        if self.bf16 and not self.use_gpu:
            raise ValueError("bf16 needs use_gpu: CPU training runs in float32")
        if self.load_in_4bit:
            import importlib.util

            if not self.use_gpu:
                raise ValueError("load_in_4bit needs use_gpu: bitsandbytes 4-bit kernels are CUDA only")
            if importlib.util.find_spec("bitsandbytes") is None:
                raise ValueError("load_in_4bit needs the bitsandbytes package: pip install bitsandbytes")
        return self


@dataclass(frozen=True)
class TrainResult:
    """What a finished run left behind.

    Attributes:
        adapter_dir: the final adapter (peft files plus ``raygate_adapter.json``).
        checkpoint_path: the last checkpoint, a valid ``resume_from``.
        steps: optimizer steps in all, resumed ones included.
        start_step: the step this run started at (0 unless resumed).
        epochs: epochs done in all.
        train_loss: mean train loss (per assistant token) of the last epoch.
        val_loss: validation loss after training.
        val_loss_before: validation loss of the base model, before any training.
        tokens_per_s: training throughput of the last epoch, all workers together.
    """

    adapter_dir: Path
    checkpoint_path: Path
    steps: int
    start_step: int
    epochs: int
    train_loss: float
    val_loss: float
    val_loss_before: float
    tokens_per_s: float


# ---------------------------------------------------------------------------------------------- loop


def _build_model(config: TrainConfig, device: "torch.device", adapter_dir: Path | None) -> "torch.nn.Module":
    """The base model with a fresh LoRA adapter, or with the adapter of a checkpoint."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if config.bf16 else torch.float32}
    if config.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=kwargs["dtype"]
        )
        kwargs["device_map"] = {"": device}
    base = AutoModelForCausalLM.from_pretrained(config.base_model, **kwargs)
    if config.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base)
    if adapter_dir is not None:
        return PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    lora = LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
        target_modules=config.target_modules, task_type="CAUSAL_LM",
    )
    return get_peft_model(base, lora)


def _loss_sum(model: "torch.nn.Module", batch: dict[str, "torch.Tensor"], bf16: bool) -> tuple["torch.Tensor", int]:
    """Summed next-token loss over the labelled tokens, and their count."""
    import torch
    import torch.nn.functional as F

    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return loss, int((labels != IGNORE_INDEX).sum())


def _evaluate(session: Session, model: "torch.nn.Module", examples: list[dict[str, list[int]]], pad_id: int,
              batch_size: int) -> float:
    """Validation loss per answer token; each worker takes every world-th example."""
    import torch

    model = getattr(model, "module", model)
    model.eval()
    loss, tokens = 0.0, 0
    shard = examples[session.rank :: session.world]
    with torch.no_grad():
        for i in range(0, len(shard), batch_size):
            batch = {k: v.to(session.device) for k, v in collate(shard[i : i + batch_size], pad_id).items()}
            batch_loss, batch_tokens = _loss_sum(model, batch, session.config.bf16)
            loss, tokens = loss + float(batch_loss), tokens + batch_tokens
    model.train()
    loss, tokens = session.all_reduce([loss, float(tokens)])
    return loss / max(tokens, 1.0)


def _summarize(session: Session, sums: list[float]) -> dict[str, float]:
    """Train loss per answer token and tokens/s (step time only, reports excluded), all workers."""
    loss, labels, tokens_per_s = session.all_reduce([sums[0], sums[1], sums[2] / max(sums[3], 1e-9)])
    return {"train_loss": loss / max(labels, 1.0), "tokens_per_s": tokens_per_s}


def train_loop(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Train a LoRA adapter; the body of every Ray Train worker, or of one plain process.

    Checkpoints (and validation) come at each epoch end; train loss and tokens/s every
    ``report_every_steps`` steps too. A resumed run continues the step and epoch count
    and the optimizer state of its checkpoint.

    Args:
        config_dict: a ``TrainConfig`` as a dict (what ``TorchTrainer`` passes).

    Returns:
        The last metrics, with ``checkpoint_path`` when run without Ray.
    """
    import torch
    from torch.utils.data import DataLoader, DistributedSampler
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    config = TrainConfig.model_validate(config_dict)
    torch.manual_seed(config.seed)
    session = Session(config)
    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_set = encode_file(tokenizer, config.train_file, config.max_length)
    val_set = encode_file(tokenizer, config.validation_file, config.max_length)

    resume = session.initial_checkpoint()
    state: dict[str, Any] = {"step": 0, "epoch": 0}
    if resume is not None:
        if not (Path(resume) / STATE_FILE).is_file():
            raise ValueError(f"{resume} is no checkpoint of raygate train (no {STATE_FILE})")
        state = torch.load(Path(resume) / STATE_FILE, map_location="cpu", weights_only=True)
        if state["epoch"] >= config.epochs:
            raise ValueError(f"{resume} has done {state['epoch']} epochs already: set epochs above that")
    model = _build_model(config, session.device, Path(resume) if resume is not None else None)
    model = session.prepare(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    if resume is not None:
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate
    else:
        # A fresh LoRA update is zero (B = 0): this is the base model's loss.
        state["val_loss_before"] = _evaluate(session, model, val_set, pad_id, config.batch_size)
    step = start_step = state["step"]

    sampler = DistributedSampler(train_set, num_replicas=session.world, rank=session.rank, shuffle=True,
                                 seed=config.seed)
    loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler,
                        collate_fn=lambda b: collate(b, pad_id))
    total = len(loader) * (config.epochs - state["epoch"])
    bar = tqdm(total=total, desc="train", disable=session.rank != 0, mininterval=2.0)
    metrics: dict[str, Any] = {}
    model.train()
    for epoch in range(state["epoch"], config.epochs):
        sampler.set_epoch(epoch)
        epoch_sums, window = [0.0] * 4, [0.0] * 4  # loss, answer tokens, input tokens, step seconds
        for batch in loader:
            started = time.perf_counter()
            batch = {k: v.to(session.device) for k, v in batch.items()}
            loss_sum, n_labels = _loss_sum(model, batch, config.bf16)
            (loss_sum / max(n_labels, 1)).backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            sums = [loss_sum.item(), float(n_labels), float(batch["attention_mask"].sum()),
                    time.perf_counter() - started]
            epoch_sums = [a + b for a, b in zip(epoch_sums, sums)]
            window = [a + b for a, b in zip(window, sums)]
            if step % config.report_every_steps == 0 and step % len(loader) != 0:
                metrics = {"step": step, "epoch": epoch, "start_step": start_step, **_summarize(session, window)}
                bar.set_postfix(loss=f"{metrics['train_loss']:.4f}")
                session.report(metrics, None, {})
                window = [0.0] * 4
        metrics = {"step": step, "epoch": epoch + 1, "start_step": start_step, **_summarize(session, epoch_sums),
                   "val_loss_before": state["val_loss_before"],
                   "val_loss": _evaluate(session, model, val_set, pad_id, config.batch_size)}
        state = {"step": step, "epoch": epoch + 1, "val_loss_before": state["val_loss_before"],
                 "optimizer": optimizer.state_dict(), "metrics": metrics}
        bar.set_postfix(loss=f"{metrics['train_loss']:.4f}", val_loss=f"{metrics['val_loss']:.4f}")
        session.report(metrics, model, state)
    bar.close()
    return {**metrics, "checkpoint_path": str(session.last_checkpoint) if session.last_checkpoint else None}


# ---------------------------------------------------------------------------------------------- driver


def train(config: TrainConfig, *, use_ray: bool = True, callbacks: list[Any] | None = None) -> TrainResult:
    """Run a training job and write the final adapter to ``<output_dir>/adapter/``.

    Args:
        config: the run.
        use_ray: run on ``TorchTrainer`` (connecting to, or starting, a Ray cluster);
            False runs ``train_loop`` in this process.
        callbacks: Ray Train callbacks (``tune.py`` passes Tune's report callback).

    Returns:
        The adapter dir, last checkpoint and metrics.
    """
    config.output_dir.mkdir(parents=True, exist_ok=True)
    if use_ray:
        from ray.train import CheckpointConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        trainer = TorchTrainer(
            train_loop,
            train_loop_config=config.model_dump(mode="json"),
            scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu),
            torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
            run_config=RunConfig(
                # A fresh name per run: Ray Train would otherwise resume a same-named run on its own.
                name=f"train-{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}",
                storage_path=str((config.output_dir / "ray_results").resolve()),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                callbacks=callbacks,
            ),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("training reported no checkpoint")
        metrics, checkpoint = dict(result.metrics), Path(result.checkpoint.path)
    else:
        metrics = train_loop(config.model_dump(mode="json"))
        checkpoint = Path(metrics["checkpoint_path"])
    return write_adapter(config, metrics, checkpoint, config.output_dir / "adapter")


def checkpoint_metrics(checkpoint: Path) -> dict[str, Any]:
    """The epoch-end metrics a checkpoint was saved with (step, epoch, losses, tokens/s)."""
    import torch

    return dict(torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=True)["metrics"])


def write_adapter(config: TrainConfig, metrics: dict[str, Any], checkpoint: Path, adapter_dir: Path) -> TrainResult:
    """Copy a checkpoint's peft files to ``adapter_dir`` and write ``raygate_adapter.json``.

    Args:
        config: the run that made the checkpoint (recorded in the metadata).
        metrics: its epoch-end metrics (``checkpoint_metrics``).
        checkpoint: a checkpoint dir of ``train_loop``.
        adapter_dir: the dir to (re)create.

    Returns:
        The adapter and its metrics.
    """
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    shutil.copytree(checkpoint, adapter_dir, ignore=shutil.ignore_patterns(STATE_FILE))
    digest = hashlib.sha256()
    for path in (config.train_file, config.validation_file):
        digest.update(Path(path).read_bytes())
    result = TrainResult(
        adapter_dir=adapter_dir, checkpoint_path=checkpoint, steps=int(metrics["step"]),
        start_step=int(metrics["start_step"]), epochs=int(metrics["epoch"]), train_loss=float(metrics["train_loss"]),
        val_loss=float(metrics["val_loss"]), val_loss_before=float(metrics["val_loss_before"]),
        tokens_per_s=float(metrics["tokens_per_s"]),
    )
    metadata = {
        "base_model": str(config.base_model),
        "dataset_hash": digest.hexdigest(),
        "config": config.model_dump(mode="json"),
        "metrics": {"train_loss": result.train_loss, "val_loss": result.val_loss,
                    "val_loss_before": result.val_loss_before, "tokens_per_s": result.tokens_per_s,
                    "steps": result.steps},
        "created_at": time.time(),  # Unix seconds, as training/registry.py's AdapterMetadata reads it
    }
    (adapter_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2), encoding="utf-8")
    logger.info("Adapter at %s: val_loss %.4f (before %.4f), %s steps", adapter_dir, result.val_loss,
                result.val_loss_before, result.steps)
    return result

