"""TrainerEngine.run_job: fine-tune a causal LM as one more kind of kiln run.

There is no training loop here. ``run_job`` prepares what kiln's
:class:`~kiln.engine.Trainer` takes and then calls it, so an LLM job runs in the one
worker loop on Ray Train (in-process, or DDP over ``environment.num_workers``
workers), with kiln's checkpoints, run record and registry:

    validate config (paths, CUDA, context length)   no model loaded yet
    tokenizer (+ built-in chat template if needed)
    rows -> profile -> tokens (prompt masked, truncated, packed)  -> DataLoaders
    Trainer(model=CausalLMFactory, loss="model", task=language_modeling).train(...)
        the worker builds the model (LoRA via peft), runs model(**batch).loss
    save_pretrained(output_dir) (model or adapter + tokenizer), merge, register

``run_job`` never raises for the job's own failure: it returns
``TrainingResult(success=False, error=...)`` and the status file says ``failed``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from kiln.engine.callbacks import CallbackBase
from kiln.errors import ConfigError, KilnError
from kiln.llm.config import ConfigLoader, TrainerConfig
from kiln.llm.status import TrainingState, TrainingStatusWriter

__all__ = ["TrainerEngine", "TrainingResult"]

logger = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    """What a job produced. ``error`` says what to fix when ``success`` is false."""

    success: bool
    global_step: int = 0
    runtime_sec: float = 0.0
    last_checkpoint_path: str | None = None
    final_loss: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class _Prepared:
    tokenizer: Any
    train: Any
    val: Any
    stats: dict[str, Any]
    invalid: list[str]


class TrainerEngine:
    """Runs fine-tuning jobs described by :class:`~kiln.llm.config.TrainerConfig`.

    Args:
        status_writer: where progress goes; default ``environment.status_file`` if set.
        paths: kiln's locations (:class:`kiln.paths.RunPaths`); resolved from
            ``$KILN_HOME`` when None.
        hooks: extra kiln hooks (``CallbackBase`` / ``TrainingHooks``) for the loop.
    """

    def __init__(
        self,
        status_writer: TrainingStatusWriter | None = None,
        *,
        paths: Any = None,
        hooks: list[Any] | None = None,
    ) -> None:
        self.status_writer = status_writer
        self.paths = paths
        self.hooks = list(hooks or [])

    def run_job(self, config: TrainerConfig, resume_from: str | None = None) -> TrainingResult:
        """Train, save and (optionally) merge and register; never raises for the job's failure."""
        started = time.perf_counter()
        status = self.status_writer
        try:
            if status is None and config.environment.status_file:
                status = TrainingStatusWriter(config.environment.status_file)
            _set(status, TrainingState.STARTING)
            ConfigLoader.validate_locked_config(config)
            _set(status, TrainingState.PREPARING_DATA)
            prepared = _prepare_data(config)
            result = self._train(config, prepared, status, resume_from)
            result.runtime_sec = time.perf_counter() - started
            _set(status, TrainingState.COMPLETED, step=result.global_step, loss=result.final_loss)
            return result
        except Exception as exc:  # the job's own failure: report, never raise
            message = _describe(exc)
            logger.debug("fine-tuning job failed", exc_info=True)
            if status is not None:
                try:
                    status.fail(message)
                except OSError:
                    logger.warning("could not write the status file", exc_info=True)
            return TrainingResult(
                success=False, runtime_sec=time.perf_counter() - started, error=message
            )

    def _train(
        self, config: TrainerConfig, prepared: _Prepared, status: Any, resume_from: str | None
    ) -> TrainingResult:
        from kiln.engine import Trainer
        from kiln.llm.modeling import save_output

        m, h, env = config.model, config.hyperparams, config.environment
        task = _task(prepared.tokenizer, Path(config.output.output_dir).name)
        train_loader, val_loader = _loaders(config, task, prepared)
        batches = len(train_loader)
        total_steps = batches * h.num_epochs
        if h.max_steps is not None:
            total_steps = min(total_steps, h.max_steps)
        factory = _model_factory(config, prepared.tokenizer)
        tokens_per_batch = prepared.stats["train"]["tokens"] / max(1, len(prepared.train))
        tokens_per_batch *= h.batch_size
        hook = _StatusHook(
            status,
            total_steps,
            batches,
            tokens_per_batch,
            env.logging_steps,
            val_loader is not None,
            eval_every=(h.eval_steps or 0) * h.gradient_accumulation,
        )
        _set(status, TrainingState.LOADING_MODEL, total_steps=total_steps)
        trainer = Trainer(
            model=factory,
            training_config=_training_config(config, batches, val_loader is not None),
            task_spec=task,
            hooks=([hook] if status is not None else []) + self.hooks,
            device="cuda" if env.use_gpu and env.num_workers == 0 else "cpu",
            paths=self._paths(),
        )
        results = trainer.train(train_loader, val_loader, resume_from=resume_from)
        final = results["final_metrics"]
        _set(
            status,
            TrainingState.SAVING,
            step=final.get("global_step"),
            loss=final.get("train_loss"),
        )
        model = trainer.trained_model
        out = save_output(model, prepared.tokenizer, config.output.output_dir, base=m.model_path)
        summary = _summary(config, prepared, results, model, out)
        if config.output.register_as:  # the adapter (or model) folder, before any merge
            summary["model_id"] = self._register(config, out, results)
        if config.output.merge and m.lora is not None:
            merged = out / "merged"
            model.merge_and_unload().save_pretrained(merged)
            prepared.tokenizer.save_pretrained(merged)
            summary["merged_dir"] = str(merged)
        return TrainingResult(
            success=True,
            global_step=int(final.get("global_step", 0)),
            last_checkpoint_path=results.get("latest_checkpoint_path"),
            final_loss=final.get("train_loss"),
            summary=summary,
        )

    def load_model_and_tokenizer(self, config: TrainerConfig) -> tuple[Any, Any]:
        """The model a job trains (LoRA applied when configured, KV cache off) and its
        tokenizer (pad token: eos when it has none), loaded without training."""
        from kiln.llm.modeling import load_tokenizer

        tokenizer = load_tokenizer(config.model.model_path)
        return _model_factory(config, tokenizer)(), tokenizer

    def prepare_dataset(
        self, config: TrainerConfig, profile: Any = None, tokenizer: Any = None
    ) -> tuple[Any, Any]:
        """``(train, validation or None)``: the job's rows through ``profile`` (default:
        ``config.profile``), tokenized with labels on the answers only. Samples are
        ``{"input_ids", "labels"}``; the validation rows are
        ``min(validation_max_samples, int(rows * validation_split))`` of the shuffled rows."""
        prepared = _prepare_data(config, profile, tokenizer)
        return prepared.train, prepared.val

    def _paths(self) -> Any:
        if self.paths is None:
            from kiln.paths import RunPaths

            self.paths = RunPaths.resolve()
        return self.paths

    def _register(self, config: TrainerConfig, out: Path, results: dict[str, Any]) -> int:
        from kiln.tracking import ModelRegistry

        paths = self._paths()
        final = results["final_metrics"]
        metrics = {
            k: float(v)
            for k, v in final.items()
            if k in ("train_loss", "val_loss", "val_perplexity") and isinstance(v, (int, float))
        }
        kind = "lora_adapter" if config.model.lora is not None else "causal_lm"
        registry = ModelRegistry(paths.db, paths.artifacts)
        try:
            return registry.register_model(
                str(config.output.register_as),
                out,
                config={
                    "kind": kind,
                    "base_model": str(Path(config.model.model_path).resolve()),
                    "trainer_config": config.to_dict(),
                },
                metrics=metrics,
                task_type="language_modeling",
                training_run_id=results.get("run_id"),
                description=f"{kind} from run {results['run_name']}",
                export_formats=[],
            )
        finally:
            registry.close()


# ---------------------------------------------------------------------- data
def system_prompt(config: TrainerConfig) -> str:
    """``monitoring.system_prompt_base`` with ``{date}`` replaced by today's date."""
    base = config.monitoring.system_prompt_base
    return base.replace("{date}", date.today().isoformat()) if base else ""


def _prepare_data(config: TrainerConfig, profile: Any = None, tokenizer: Any = None) -> _Prepared:
    from kiln.llm.chat import ensure_chat_template
    from kiln.llm.encoding import TokenDataset, encode_examples
    from kiln.llm.modeling import load_tokenizer
    from kiln.llm.profiles import get_profile, prepare_examples, read_rows

    if profile is None:
        profile = get_profile(config.profile.name, **config.profile.options)
    rows = read_rows(config.data.dataset_path)
    if config.data.max_samples:
        rows = rows[: config.data.max_samples]
    prepared = prepare_examples(
        rows,
        profile,
        system_prompt(config),
        skip_invalid=config.data.skip_invalid,
        source=f"data.dataset_path={config.data.dataset_path!r}",
    )
    if tokenizer is None:
        tokenizer = load_tokenizer(config.model.model_path)
    chat = any("messages" in e for e in prepared.examples)
    if chat and ensure_chat_template(tokenizer) and config.model.lora is not None:
        raise ConfigError(
            f"model.model_path={config.model.model_path!r}: the tokenizer has no chat template, "
            "and kiln's built-in one needs tokens it lacks, whose embeddings LoRA cannot learn; "
            "use a tokenizer with a chat template, the 'completion' profile, or model.lora: null"
        )
    examples = list(prepared.examples)
    random.Random(config.environment.seed).shuffle(examples)
    mon = config.monitoring
    n_val = min(mon.validation_max_samples, int(len(examples) * mon.validation_split))
    val_examples, train_examples = examples[:n_val], examples[n_val:]
    max_len, packing = config.model.max_context_length, config.data.packing
    train, train_stats = encode_examples(train_examples, tokenizer, max_len, packing=packing)
    val, val_stats = (
        encode_examples(val_examples, tokenizer, max_len) if val_examples else ([], None)
    )
    if not train:
        raise ConfigError(
            f"no training sequence has a token to learn from after truncation to "
            f"model.max_context_length={max_len}; raise it or shorten the prompts"
        )
    stats = {"train": train_stats.to_dict()}
    if val_stats is not None:
        stats["val"] = val_stats.to_dict()
    return _Prepared(
        tokenizer, TokenDataset(train), TokenDataset(val) if val else None, stats, prepared.invalid
    )


def _task(tokenizer: Any, name: str) -> Any:
    from kiln.config import TaskSpec

    return TaskSpec.language_modeling(
        name=name or "llm",
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        input_column="input_ids",
        label_column="labels",
        modality="text",
    )


def _loaders(config: TrainerConfig, task: Any, prepared: _Prepared) -> tuple[Any, Any]:
    from kiln.data.collate import DataLoaderConfig, DataLoaderFactory

    env, bs = config.environment, config.hyperparams.batch_size
    factory = DataLoaderFactory(task, seed=env.seed, pin_memory=env.use_gpu, num_workers=0)
    train = factory.create_loader(prepared.train, DataLoaderConfig(bs, shuffle=True))
    val = None
    if prepared.val is not None:
        val = factory.create_loader(prepared.val, DataLoaderConfig(bs, shuffle=False), is_eval=True)
    return train, val


def _model_factory(config: TrainerConfig, tokenizer: Any) -> Any:
    """The picklable factory each worker builds the job's model with."""
    from kiln.llm.modeling import CausalLMFactory

    m = config.model
    return CausalLMFactory(
        model_path=m.model_path,
        lora=None if m.lora is None else _lora_dict(m.lora),
        vocab_size=len(tokenizer),
        gradient_checkpointing=m.gradient_checkpointing,
        load_in_4bit=m.load_in_4bit,
    )


def _lora_dict(lora: Any) -> dict[str, Any]:
    return {
        "r": lora.r,
        "alpha": lora.alpha,
        "dropout": lora.dropout,
        "target_modules": lora.target_modules,
    }


def _training_config(config: TrainerConfig, batches_per_epoch: int, has_val: bool) -> Any:
    """The kiln TrainingConfig of the job: checkpoints every ``save_steps`` optimizer
    steps (inside epochs too) and after the last epoch; validation at every epoch end
    and every ``eval_steps`` optimizer steps."""
    from kiln.config import TrainingConfig

    h, env, out = config.hyperparams, config.environment, config.output
    total_steps = batches_per_epoch * h.num_epochs
    if h.max_steps is not None:
        total_steps = min(total_steps, h.max_steps)
    optimizer_steps = max(1, math.ceil(total_steps / h.gradient_accumulation))
    warmup_ratio = min(0.99, h.warmup_steps / optimizer_steps)
    precision = h.fp_precision
    return TrainingConfig(
        random_seed=env.seed,
        learning_rate=float(h.learning_rate),
        batch_size=h.batch_size,
        epochs=h.num_epochs,
        max_steps=h.max_steps,
        warmup_ratio=warmup_ratio,
        validation_split=0.0,
        loss="model",
        optimizer="adamw",
        lr_scheduler=h.lr_scheduler,
        weight_decay=float(h.weight_decay),
        max_grad_norm=h.max_grad_norm,
        gradient_accumulation_steps=h.gradient_accumulation,
        num_workers=env.num_workers,
        use_gpu=env.use_gpu,
        use_amp=precision != "fp32",
        amp_dtype=precision if precision != "fp32" else "auto",
        keep_best_k=1,
        keep_last_n=1,
        save_every_n_epochs=h.num_epochs,  # epoch ends: the last one only
        save_every_n_steps=h.save_steps,
        eval_every_n_steps=h.eval_steps if has_val else None,
        monitor="val_loss" if has_val else "train_loss",
        run_name=out.run_name or f"llm-{Path(out.output_dir).name}",
        tracking=env.tracking,
        log_every_n_steps=env.logging_steps,
    ).validate()


# ---------------------------------------------------------------------- status
class _StatusHook(CallbackBase):
    """Writes step, loss, learning rate, tokens/s and ETA from rank 0 of the loop."""

    def __init__(
        self,
        writer: TrainingStatusWriter | None,
        total_steps: int,
        batches_per_epoch: int,
        tokens_per_batch: float,
        every: int,
        has_val: bool,
        eval_every: int = 0,
    ) -> None:
        self.writer, self.total_steps = writer, total_steps
        self.batches_per_epoch, self.tokens_per_batch = batches_per_epoch, tokens_per_batch
        self.every, self.has_val = max(1, every), has_val
        self.eval_every = eval_every if has_val else 0  # in batches
        self.step, self.epoch, self.t0 = 0, 0, 0.0
        self.steps_since_t0 = 0

    def _write(self, state: TrainingState | None = None, **fields: Any) -> None:
        if self.writer is not None and self.rank == 0:
            self.writer.update(state, **fields)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.t0 = time.perf_counter()
        self._write(TrainingState.TRAINING, total_steps=self.total_steps)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch = epoch

    def on_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        # ``batch`` counts within the epoch, also in one resumed from a mid-epoch checkpoint
        self.step = (self.epoch - 1) * self.batches_per_epoch + batch + 1
        self.steps_since_t0 += 1
        last_of_epoch = batch + 1 == self.batches_per_epoch
        evaluates = bool(self.eval_every) and self.step % self.eval_every == 0
        if self.step % self.every and not last_of_epoch and not evaluates:
            return
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else None
        rate = self.tokens_per_batch * self.steps_since_t0 * self.world_size / elapsed
        evaluating = (last_of_epoch and self.has_val) or evaluates
        state = TrainingState.EVALUATING if evaluating else TrainingState.TRAINING
        self._write(
            state,
            step=self.step,
            epoch=self.epoch,
            loss=float((logs or {}).get("loss", float("nan"))),
            learning_rate=lr,
            tokens_per_s=round(rate, 1),
        )

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        if "step" in metrics:  # an eval_steps validation: training goes on
            self._write(TrainingState.TRAINING, eval_loss=metrics.get("val_loss"))

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        self.step = int(logs.get("global_step", self.step))
        self._write(
            TrainingState.TRAINING,
            step=self.step,
            epoch=epoch,
            loss=logs.get("train_loss"),
            eval_loss=logs.get("val_loss"),
        )


def _set(status: TrainingStatusWriter | None, state: TrainingState, **fields: Any) -> None:
    if status is not None:
        status.update(state, **{k: v for k, v in fields.items() if v is not None})


def _describe(exc: BaseException) -> str:
    """The most useful message: a KilnError's own, else the innermost cause's."""
    seen = exc
    while not isinstance(seen, KilnError) and seen.__cause__ is not None:
        seen = seen.__cause__
    if isinstance(seen, KilnError):
        return str(seen)
    return f"{type(exc).__name__}: {exc}"


def _summary(
    config: TrainerConfig, prepared: _Prepared, results: dict[str, Any], model: Any, out: Path
) -> dict[str, Any]:
    final = results["final_metrics"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {
        "output_dir": str(out),
        "run_name": results["run_name"],
        "run_id": results.get("run_id"),
        "epochs": final.get("epoch"),
        "train_loss": final.get("train_loss"),
        "val_loss": final.get("val_loss"),
        "val_perplexity": final.get("val_perplexity"),
        "tokens_per_s": final.get("train_tokens_per_s"),
        "history": [{k: v for k, v in h.items() if k != "steps"} for h in results["history"]],
        "steps": [row for h in results["history"] for row in h.get("steps", [])],  # log steps
        "skipped_rows": len(prepared.invalid),
        "invalid_rows": prepared.invalid[:20],
        "truncated": prepared.stats["train"]["truncated"]
        + prepared.stats.get("val", {}).get("truncated", 0),
        "encoding": prepared.stats,
        "trainable_params": trainable,
        "total_params": total,
        "lora": config.model.lora is not None,
        "world_size": results.get("world_size"),
        "resumed_from": results.get("resumed_from"),
    }
