"""A LoRA hyper-parameter sweep: Ray Tune over learning rate and rank, ASHA stopping.

Ray 2.60's Train V2 cannot run a ``TorchTrainer`` as a Tune trainable, so each trial is
a Tune *function* that calls :func:`training.train.train` (``TorchTrainer.fit()``) with
Tune's ``TuneReportCallback``: every epoch-end report of the workers reaches Tune, and
ASHA stops trials whose ``val_loss`` trails at a rung. The trial function asks for a
sliver of a CPU; the training workers hold the real resources.

Layout under ``<train.output_dir>``::

    tune/<run>/                  Tune's own results
    trials/<trial id>/           each trial's ray_results/ (and adapter/ if it ran to the end)
    best_adapter/                the best trial's last checkpoint as an adapter + raygate_adapter.json
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from serve_app.config_base import BaseConfig
from training.session import PLACEMENT_GROUP_KEY
from training.train import TrainConfig, checkpoint_metrics, train, write_adapter

__all__ = ["SweepResult", "TrialSummary", "TuneConfig", "sweep"]

logger = logging.getLogger(__name__)

_CHECKPOINT_PATH_KEY = "checkpoint_path"  # what ray.tune.integration.ray_train.TuneReportCallback adds


class TuneConfig(BaseConfig):
    """A sweep (``raygate tune``): a base train config and the grid to search around it."""

    train: TrainConfig = Field(description="The base run; each trial overrides learning_rate, r and epochs.")
    learning_rates: list[PositiveFloat] = Field(
        default_factory=lambda: [1e-4, 3e-4, 1e-3], min_length=1, description="Grid of learning rates."
    )
    ranks: list[PositiveInt] = Field(default_factory=lambda: [8], min_length=1, description="Grid of LoRA ranks.")
    num_samples: PositiveInt = Field(1, description="Times the whole grid is run (trials = samples x grid).")
    max_t: PositiveInt | None = Field(None, description="Epochs per trial (ASHA's max_t); default train.epochs.")
    grace_period: PositiveInt = Field(1, description="Epochs every trial gets before ASHA may stop it.")
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA keeps the best 1/reduction_factor per rung.")
    max_concurrent_trials: PositiveInt = Field(1, description="Trials at once (1 on CPU: each needs its workers).")
    time_budget_s: PositiveFloat | None = Field(None, description="Stop all trials after this many seconds.")

    @model_validator(mode="after")
    def _check_rungs(self) -> "TuneConfig":
        if self.grace_period > self.epochs:
            raise ValueError(f"grace_period ({self.grace_period}) exceeds the epochs per trial ({self.epochs})")
        return self

    @property
    def epochs(self) -> int:
        """Epochs per trial."""
        return self.max_t or self.train.epochs


@dataclass(frozen=True)
class TrialSummary:
    """One trial: its hyper-parameters and last reported metrics.

    Attributes:
        trial_id: Tune's id.
        learning_rate: the trial's learning rate.
        r: the trial's LoRA rank.
        val_loss: the last reported validation loss (None: the trial failed before one).
        epochs: epochs done (fewer than asked when ASHA stopped it).
        checkpoint_path: its last checkpoint.
        error: why it failed, if it did.
    """

    trial_id: str
    learning_rate: float
    r: int
    val_loss: float | None
    epochs: int
    checkpoint_path: Path | None
    error: str | None = None


@dataclass(frozen=True)
class SweepResult:
    """A finished sweep.

    Attributes:
        trials: every trial, in Tune's order.
        best: the trial with the lowest ``val_loss``.
        best_adapter_dir: the best trial's adapter (peft files + ``raygate_adapter.json``).
    """

    trials: list[TrialSummary]
    best: TrialSummary
    best_adapter_dir: Path


def _release_workers(trial: Any) -> None:
    """Remove the placement group of a trial's Train workers, unless already gone.

    Tune stops a trial (ASHA) by killing its actor, and with it the Train controller,
    before the controller can remove its workers' placement group. Ray Train's own
    PlacementGroupCleaner needs the state API, which a cluster without the dashboard
    (or a host running several clusters) lacks: the group then holds its CPUs/GPUs
    until shutdown and the next trial waits for them forever. A trial that ended on its
    own has removed its group already.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    group_id = (trial.last_result or {}).get(PLACEMENT_GROUP_KEY)
    if not group_id:
        return
    group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id)))
    try:
        if placement_group_table(group).get("state") != "REMOVED":
            remove_placement_group(group)
            logger.info("Released the Train workers of stopped trial %s", trial.trial_id)
    except Exception:  # noqa: BLE001 - best effort: the group may vanish between the two calls
        logger.debug("Placement group %s of trial %s already gone", group_id, trial.trial_id, exc_info=True)


def _release_callback() -> Any:
    """A Tune callback that runs ``_release_workers`` for every finished or failed trial."""
    from ray import tune

    class ReleaseWorkers(tune.Callback):
        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            _release_workers(trial)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            _release_workers(trial)

    return ReleaseWorkers()


def _trial(params: dict[str, Any]) -> None:
    """One Tune trial: a Ray Train run whose epoch reports flow to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    config = _trial_config(TrainConfig.model_validate(params["train"]), params, tune.get_context().get_trial_id())
    train(config, callbacks=[TuneReportCallback()])


def _trial_config(base: TrainConfig, params: dict[str, Any], trial_id: str) -> TrainConfig:
    """A trial's train config: the base with the trial's hyper-parameters and its own output dir."""
    return base.model_copy(update={
        "learning_rate": params["learning_rate"], "r": params["r"], "epochs": params["epochs"],
        "output_dir": base.output_dir / "trials" / trial_id,
    })


def sweep(config: TuneConfig) -> SweepResult:
    """Run the grid under ASHA and keep the best trial's adapter.

    Args:
        config: the sweep.

    Returns:
        Every trial's ``val_loss`` and the best one, copied to ``<output_dir>/best_adapter/``.

    Raises:
        RuntimeError: no trial reported a validation loss.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    output_dir = config.train.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    param_space = {
        "train": config.train.model_dump(mode="json"),
        "epochs": config.epochs,
        "learning_rate": tune.grid_search(config.learning_rates),
        "r": tune.grid_search(config.ranks),
    }
    scheduler = ASHAScheduler(
        time_attr="epoch", metric="val_loss", mode="min", max_t=config.epochs,
        grace_period=config.grace_period, reduction_factor=config.reduction_factor,
        # A trial that reaches max_t ends on its own: stopping it would kill its Train run mid-shutdown.
        stop_last_trials=False,
    )
    tuner = tune.Tuner(
        tune.with_resources(_trial, {"cpu": 0.01}),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            scheduler=scheduler, num_samples=config.num_samples, max_concurrent_trials=config.max_concurrent_trials,
            time_budget_s=config.time_budget_s,
        ),
        run_config=tune.RunConfig(
            name=f"tune-{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}",
            storage_path=str((output_dir / "tune").resolve()),
            callbacks=[_release_callback()],
        ),
    )
    trials = [_summarize(result) for result in tuner.fit()]
    scored = [t for t in trials if t.val_loss is not None and math.isfinite(t.val_loss) and t.checkpoint_path]
    if not scored:
        raise RuntimeError(f"no trial reported a val_loss: {[t.error for t in trials]}")
    best = min(scored, key=lambda t: t.val_loss)
    best_params = {"learning_rate": best.learning_rate, "r": best.r, "epochs": config.epochs}
    best_config = _trial_config(config.train, best_params, best.trial_id)
    metrics = checkpoint_metrics(best.checkpoint_path)
    trained = write_adapter(best_config, metrics, best.checkpoint_path, output_dir / "best_adapter")
    logger.info("Best of %s trials: %s (lr %s, r %s), val_loss %.4f", len(trials), best.trial_id,
                best.learning_rate, best.r, best.val_loss)
    return SweepResult(trials=trials, best=best, best_adapter_dir=trained.adapter_dir)


def _summarize(result: Any) -> TrialSummary:
    """A Tune ``Result`` as a ``TrialSummary``, from its last epoch-end report.

    The last report overall may be a mid-epoch one (no ``val_loss``) when the time
    budget stopped the trial, so the epoch-end rows of its history are searched.
    """
    metrics, params = result.metrics or {}, result.config or {}
    frame = result.metrics_dataframe
    if frame is not None and "val_loss" in frame:
        rows = frame.dropna(subset=["val_loss"])
        if len(rows):
            metrics = {**metrics, **rows.iloc[-1].to_dict()}
    checkpoint = metrics.get(_CHECKPOINT_PATH_KEY)
    val_loss = metrics.get("val_loss")
    return TrialSummary(
        trial_id=str(metrics.get("trial_id", Path(str(result.path)).name)),
        learning_rate=float(params["learning_rate"]), r=int(params["r"]),
        val_loss=float(val_loss) if val_loss is not None else None, epochs=int(metrics.get("epoch", 0)),
        checkpoint_path=Path(checkpoint) if isinstance(checkpoint, str) and checkpoint else None,
        error=repr(result.error) if result.error else None,
    )


# ---------------------------------------------------------------------------------------------- CLI
