"""Where the training loop runs: a Ray Train worker (rank, device, DDP, reports, checkpoints) or a plain process.

Everything Ray-specific in ``training.train.train_loop`` goes through ``Session``, so the same
loop runs on a bare GPU machine without Ray (rank 0 of 1, checkpoints in ``output_dir``).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from training.train import TrainConfig

__all__ = ["PLACEMENT_GROUP_KEY", "STATE_FILE", "Session", "save_checkpoint"]

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
PLACEMENT_GROUP_KEY = "placement_group_id"  # reported under Ray Train: the workers' placement group


class Session:
    """Where the loop runs: a Ray Train worker, or a plain process (rank 0 of 1)."""

    def __init__(self, config: "TrainConfig") -> None:
        import torch

        self.config = config
        self.ray = _in_ray_train()
        self.placement_group_id: str | None = None
        if self.ray:
            import ray.train
            import ray.train.torch
            from ray.util import get_current_placement_group

            context = ray.train.get_context()
            self.rank, self.world = context.get_world_rank(), context.get_world_size()
            self.device = ray.train.torch.get_device()
            group = get_current_placement_group()
            self.placement_group_id = group.id.hex() if group is not None else None
        else:
            self.rank, self.world = 0, 1
            self.device = torch.device("cuda" if config.use_gpu else "cpu")
        self.last_checkpoint: Path | None = None

    def prepare(self, model: "torch.nn.Module") -> "torch.nn.Module":
        """Move to the device; wrap in DDP under Ray Train (a 4-bit model is already placed)."""
        if self.ray:
            import ray.train.torch

            return ray.train.torch.prepare_model(model, move_to_device=not self.config.load_in_4bit)
        return model if self.config.load_in_4bit else model.to(self.device)

    def initial_checkpoint(self) -> Path | None:
        """Ray's own checkpoint (a restarted run) first, else ``resume_from``."""
        if self.ray:
            import ray.train

            checkpoint = ray.train.get_checkpoint()
            if checkpoint is not None:
                return Path(checkpoint.path)
        return self.config.resume_from

    def report(self, metrics: dict[str, float], model: "torch.nn.Module | None", state: dict[str, Any]) -> None:
        """Report metrics; with a model, also save a checkpoint (rank 0 writes it)."""
        if not self.ray:
            logger.info("step %s: %s", metrics["step"], metrics)
            if model is not None:
                path = self.config.output_dir / "checkpoints" / f"checkpoint_{metrics['step']:06d}"
                save_checkpoint(model, state, path)
                self.last_checkpoint = path
            return
        import ray.train

        if self.placement_group_id:
            # Lets a Tune sweep free the workers of a trial it stops (see training/tune.py).
            metrics = {**metrics, PLACEMENT_GROUP_KEY: self.placement_group_id}
        if model is None or self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(model, state, Path(tmp))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def all_reduce(self, values: list[float]) -> list[float]:
        """Sum across workers (identity on one)."""
        import torch
        import torch.distributed as dist

        if self.world == 1 or not dist.is_initialized():
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()


def _in_ray_train() -> bool:
    """True in a Ray Train worker; False without Ray, in a driver, or in a Tune trial's own process."""
    try:
        import ray.train

        ray.train.get_context()
        return True
    except (ImportError, RuntimeError, DeprecationWarning):  # Ray raises the last one in a Tune function
        return False


def save_checkpoint(model: "torch.nn.Module", state: dict[str, Any], path: Path) -> None:
    import torch

    path.mkdir(parents=True, exist_ok=True)
    getattr(model, "module", model).save_pretrained(path)
    torch.save(state, path / STATE_FILE)
