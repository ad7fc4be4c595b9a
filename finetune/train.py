"""Fine-tune the student on the compiled MAPD training set with TRL (LoRA by default, or full).

In: a ``datasets.Dataset`` made by ``mapd_dspy.finetune.compile`` with the columns ``prompt`` (system + user
chat messages), ``completion`` (one assistant message), ``kind`` (``"rationale"`` or ``"mistake"``),
``example_id`` and ``teacher``.
Out: under ``output_dir`` the LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) or, for
``method="full"``, the whole model; the tokenizer; and ``training_config.json`` (settings, base model, rows per
kind, metrics). The folder is written under a temporary name and renamed at the end, so a crash never leaves a
half-written adapter where a server would look for one.

The objective is the paper's two-task loss ``a * L_mistake + (1 - a) * L_rationale`` (``a`` =
``TrainSettings.mistake_weight``), each ``L`` the mean over examples of the per-example token-mean cross-entropy
on completion tokens only (see ``kind_example_weights`` for batches that hold one kind only).

Command line (one process; CPU or one GPU)::

    python -m mapd_dspy.finetune.train --dataset runs/X/train_dataset --base-model PATH_OR_SPEC \\
        --output-dir runs/X/adapter --set mistake_weight=0.5 --set max_steps=100

Several GPUs (data parallel, bf16; set ``num_processes`` in the YAML or pass ``--num_processes N``)::

    accelerate launch --config_file finetune/accelerate_multi_gpu.yaml -m mapd_dspy.finetune.train \\
        --dataset DIR --base-model PATH --output-dir DIR [--set key=value ...]

The same with ``finetune/accelerate_cpu.yaml`` runs one CPU process (what the tests exercise).
``--base-model`` accepts anything ``mapd_dspy.models.resolve_model`` does (a folder, a hub id, or
``embedded:smollm2-135m-instruct``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from mapd_dspy.validation import StrictSection

KIND_IDS: dict[str, int] = {"rationale": 0, "mistake": 1}
MISTAKE_KIND_ID = KIND_IDS["mistake"]
TRAINING_CONFIG_FILE = "training_config.json"


class TrainSettings(StrictSection):
    """Everything that shapes a fine-tuning run; saved beside the adapter as ``training_config.json``."""

    method: Literal["lora", "full"] = Field(
        "lora", description="lora: train a LoRA adapter on the frozen base; full: update every weight."
    )
    mistake_weight: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="a in a * L_mistake + (1 - a) * L_rationale: 1 trains on mistake explanations only, "
        "0 on rationales only.",
    )
    lora_rank: int = Field(16, ge=1, description="LoRA rank r.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling alpha (update scaled by alpha / r).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Names of the linear layers that get LoRA adapters.",
    )
    epochs: float = Field(1.0, gt=0.0, description="Passes over the training set (ignored if max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1 = use epochs.")
    learning_rate: float = Field(2e-4, gt=0.0, description="Peak learning rate (linear decay).")
    batch_size: int = Field(2, ge=1, description="Examples per device per forward pass. With accumulation 2 the optimizer still sees 4 per step; SmolLM2 on CPU peaked at 8.1 GiB with 4 at once, 4.5 GiB with 2.")
    gradient_accumulation_steps: int = Field(2, ge=1, description="Forward passes per optimizer step.")
    max_length: int = Field(512, ge=8, description="Tokens per example (prompt + completion); longer is cut.")
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together (less padding, faster steps)."
    )
    seed: int = Field(0, description="Seed for LoRA init, data order and dropout.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA with bf16 when available, else CPU in float32."
    )
    logging_steps: int = Field(1, ge=1, description="Log loss and metrics every this many steps.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, ~30% more compute."
    )


class TrainResult(BaseModel):
    """What ``train`` produced: where the adapter (or full model) is, and how the run went."""

    adapter_dir: str = Field(description="Folder with the adapter (LoRA) or the full model, tokenizer and config.")
    metrics: dict[str, float] = Field(
        description="train_loss, steps, seconds, tokens (non-pad), tokens_per_second, padding_fraction, ..."
    )
    settings: TrainSettings


# ---------------------------------------------------------------------------------------------------------
# The two-task loss


def per_example_token_mean_nll(token_log_probs: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq) log-probs of the next-token labels and a mask of the scored positions -> (batch,) losses.

    Each example's loss is the mean over its own completion tokens, so a long explanation does not outweigh a
    short rationale just by being long (the paper's per-task losses are per-example means).
    """
    token_counts = label_mask.sum(dim=1)
    summed_nll = -(token_log_probs * label_mask).sum(dim=1)
    return summed_nll / token_counts.clamp(min=1)


def kind_example_weights(kind_ids: torch.Tensor, mistake_weight: float) -> torch.Tensor:
    """Per-example weights so that ``sum(w_i * loss_i) = a * mean(mistake losses) + (1 - a) * mean(rationale)``.

    w_i = a / n_mistake for mistake rows and (1 - a) / n_rationale for rationale rows of the batch.

    A batch holding one kind only gets that kind's mean times its own coefficient (a or 1 - a), and the absent
    kind contributes nothing; the weights are deliberately *not* renormalised to sum to 1. Renormalising would
    give a mistake-only batch full weight whatever ``a`` is, and length grouping makes one-kind batches common
    (explanations and rationales differ in length), so ``a`` would quietly stop meaning anything. Without
    renormalisation a=1 never trains on rationales and a=0 never on mistakes, in every batch.
    """
    is_mistake = kind_ids == MISTAKE_KIND_ID
    mistake_count = is_mistake.sum().clamp(min=1)
    rationale_count = (~is_mistake).sum().clamp(min=1)
    return torch.where(is_mistake, mistake_weight / mistake_count, (1.0 - mistake_weight) / rationale_count)


def mistake_aware_loss(example_losses: torch.Tensor, kind_ids: torch.Tensor, mistake_weight: float) -> torch.Tensor:
    """The batch loss ``a * L_mistake + (1 - a) * L_rationale`` from per-example losses."""
    weights = kind_example_weights(kind_ids.to(example_losses.device), mistake_weight)
    return (weights.to(example_losses.dtype) * example_losses).sum()


def mean_loss_per_kind(example_losses: torch.Tensor, kind_ids: torch.Tensor) -> dict[str, float]:
    """For logging: the mean loss of each kind present in the batch."""
    means = {}
    for kind, kind_id in KIND_IDS.items():
        selected = example_losses[kind_ids == kind_id]
        if selected.numel():
            means[f"{kind}_loss"] = selected.detach().mean().item()
    return means


def completion_nll_per_example(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
    """Forward a batch through a model patched by TRL's ``add_fused_lm_head``; return per-example losses.

    The fused head scores only positions whose label is not -100 (the prompt and the padding are -100), without
    building the full (batch, seq, vocab) logits.
    """
    outputs = model(**batch, use_cache=False, fused_lm_head=True)
    return per_example_token_mean_nll(outputs.log_probs, outputs.label_mask), outputs


# ---------------------------------------------------------------------------------------------------------
# Padding


def padding_fraction(batch_lengths: list[list[int]]) -> float:
    """Pad tokens / all tokens when each batch is padded to its longest sequence (dynamic padding)."""
    padded_tokens = sum(max(lengths) * len(lengths) for lengths in batch_lengths if lengths)
    real_tokens = sum(sum(lengths) for lengths in batch_lengths)
    return (padded_tokens - real_tokens) / padded_tokens if padded_tokens else 0.0


def batches_in_order(lengths: list[int], order: list[int], batch_size: int) -> list[list[int]]:
    """Split the lengths, taken in ``order``, into consecutive batches of ``batch_size``."""
    ordered = [lengths[index] for index in order]
    return [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]


def sampling_order(lengths: list[int], batch_size: int, group_by_length: bool, seed: int) -> list[int]:
    """One epoch's order: transformers' length-grouped order (what the trainer uses) or a random permutation."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    generator = torch.Generator().manual_seed(seed)
    if group_by_length:
        return list(get_length_grouped_indices(lengths, batch_size, generator=generator))
    return torch.randperm(len(lengths), generator=generator).tolist()


# ---------------------------------------------------------------------------------------------------------
# Trainer


def _make_kind_collator(base_collator):
    """Wrap TRL's collator so the int ``kind_id`` of each row reaches ``compute_loss`` as a tensor.

    TRL's ``DataCollatorForLanguageModeling`` reads only ``input_ids``/``labels``/``seq_lengths`` and drops the
    rest, so ``kind_id`` is taken out first and put back on the padded batch.
    """

    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        kind_ids = torch.tensor([example.pop("kind_id") for example in examples], dtype=torch.long)
        batch = base_collator(examples)
        batch["kind_id"] = kind_ids
        return batch

    return collate


def _sft_trainer_class():
    """Build the SFTTrainer subclass lazily: importing TRL costs seconds the CLI's --help should not pay."""
    from trl import SFTTrainer

    class MistakeAwareSFTTrainer(SFTTrainer):
        """SFTTrainer whose loss is ``a * L_mistake + (1 - a) * L_rationale``, and which counts padding."""

        # The loss is a mean over the micro-batch's examples, not a sum over the step's tokens: Trainer must
        # divide it by the gradient-accumulation steps.
        loss_is_scaled_for_ga = False

        def __init__(self, *args, mistake_weight: float, **kwargs):
            super().__init__(*args, **kwargs)
            self.mistake_weight = mistake_weight
            self.data_collator = _make_kind_collator(self.data_collator)
            self.real_token_count = 0
            self.padded_token_count = 0

        def _set_signature_columns_if_needed(self):
            # remove_unused_columns keeps only the signature columns: add kind_id so it survives to the collator.
            super()._set_signature_columns_if_needed()
            if "kind_id" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "kind_id"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # num_items_in_batch (the step's token count) is ignored: each example's loss is a mean over its own
            # tokens (see loss_is_scaled_for_ga above).
            kind_ids = inputs.pop("kind_id")
            example_losses, outputs = completion_nll_per_example(model, inputs)
            loss = mistake_aware_loss(example_losses, kind_ids, self.mistake_weight)
            if self.model.training:
                self._record_batch_metrics(inputs, outputs, example_losses, kind_ids)
            return (loss, outputs) if return_outputs else loss

        def _record_batch_metrics(self, inputs, outputs, example_losses, kind_ids):
            """Per-kind losses, token accuracy and padding for TRL's logs (averaged per logging step)."""
            attention_mask = inputs["attention_mask"]
            self.real_token_count += int(attention_mask.sum())
            self.padded_token_count += attention_mask.numel()
            metrics = self._metrics["train"]
            for name, value in mean_loss_per_kind(example_losses, kind_ids).items():
                metrics[name].append(value)
            scored = outputs.label_mask.sum().clamp(min=1)
            metrics["mean_token_accuracy"].append((outputs.is_top1.sum() / scored).item())
            metrics["padding_fraction"].append(1.0 - attention_mask.sum().item() / attention_mask.numel())
            metrics["num_tokens"] = [self.real_token_count]

    return MistakeAwareSFTTrainer


# ---------------------------------------------------------------------------------------------------------
# Settings -> TRL / PEFT objects


def use_cuda(settings: TrainSettings) -> bool:
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA device")
    return settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())


def sft_config(settings: TrainSettings, output_dir: Path):
    """TRL's SFTConfig for these settings. CPU needs use_cpu=True and bf16=False (TRL defaults to bf16)."""
    from trl import SFTConfig

    on_cuda = use_cuda(settings)
    bf16 = on_cuda and torch.cuda.is_bf16_supported()
    # LoRA keeps the frozen base in bf16 on GPU (half the memory); full fine-tuning keeps float32 master
    # weights and lets bf16 autocast do the matmuls. CPU trains in float32 throughout.
    load_dtype = "bfloat16" if bf16 and settings.method == "lora" else "float32"
    return SFTConfig(
        output_dir=str(output_dir),
        use_cpu=not on_cuda,
        bf16=bf16,
        model_init_kwargs={"dtype": load_dtype},
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        max_length=settings.max_length,
        train_sampling_strategy="group_by_length" if settings.group_by_length else "random",
        padding_free=False,  # dynamic padding to each batch's longest row, never to max_length
        packing=False,  # packing would mix kinds inside one row and break per-example losses
        completion_only_loss=True,
        seed=settings.seed,
        data_seed=settings.seed,
        logging_steps=settings.logging_steps,
        save_strategy="no",  # the final model is saved once, atomically, by train()
        report_to="none",
        remove_unused_columns=True,
        dataloader_drop_last=False,
        # TRL turns checkpointing on by default; it trades compute for memory, which a 135M model
        # on CPU does not need. Large students on small GPUs can switch it back on.
        gradient_checkpointing=settings.gradient_checkpointing,
    )


def lora_config(settings: TrainSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
    )


def with_kind_ids(dataset):
    """Add the int column ``kind_id`` (collators need tensors, not strings); reject unknown kinds."""
    unknown = set(dataset.unique("kind")) - set(KIND_IDS)
    if unknown:
        raise ValueError(f"unknown kind(s) {sorted(unknown)}; expected {sorted(KIND_IDS)}")
    return dataset.map(lambda row: {"kind_id": KIND_IDS[row["kind"]]}, desc="Adding kind_id")


def rows_per_kind(dataset) -> dict[str, int]:
    kinds = list(dataset["kind"])
    return {kind: kinds.count(kind) for kind in KIND_IDS}


# ---------------------------------------------------------------------------------------------------------
# Saving


def staging_dir_for(output_dir: Path) -> Path:
    """Same parent (so the final rename is atomic) and a name every process of a launch agrees on."""
    return output_dir.with_name(f".{output_dir.name}.partial")


def publish_dir(staging_dir: Path, output_dir: Path) -> None:
    """Move the finished folder into place, replacing an older one only after the new one is complete."""
    previous = output_dir.with_name(f".{output_dir.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    if output_dir.exists():
        output_dir.rename(previous)
    staging_dir.rename(output_dir)
    shutil.rmtree(previous, ignore_errors=True)


def write_training_config(folder: Path, settings: TrainSettings, base_model: str, counts: dict, metrics: dict):
    config = {
        "settings": settings.model_dump(),
        "base_model": base_model,
        "rows_per_kind": counts,
        "metrics": metrics,
    }
    (folder / TRAINING_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def run_metrics(trainer, train_output, seconds: float) -> dict[str, float]:
    tokens = trainer.real_token_count
    padded = trainer.padded_token_count
    return {
        "train_loss": float(train_output.training_loss),
        "steps": float(trainer.state.global_step),
        "seconds": seconds,
        "seconds_per_step": seconds / max(trainer.state.global_step, 1),
        "tokens": float(tokens),
        "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
        # Measured on the batches actually trained on (this process's share under data parallelism).
        "padding_fraction": (padded - tokens) / padded if padded else 0.0,
    }


# ---------------------------------------------------------------------------------------------------------
# Entry points


def _mistake_aware_trainer(dataset, base_model: str, staging_dir: Path, settings: TrainSettings):
    from transformers import AutoTokenizer

    return _sft_trainer_class()(
        model=base_model,
        args=sft_config(settings, staging_dir),
        train_dataset=with_kind_ids(dataset),
        processing_class=AutoTokenizer.from_pretrained(base_model),
        peft_config=lora_config(settings) if settings.method == "lora" else None,
        mistake_weight=settings.mistake_weight,
    )


def train(dataset, base_model: str, output_dir: str | os.PathLike, settings: TrainSettings) -> TrainResult:
    """Fine-tune ``base_model`` on ``dataset`` (columns in the module docstring); save under ``output_dir``."""
    output_dir = Path(output_dir).resolve()
    staging_dir = staging_dir_for(output_dir)
    trainer = _mistake_aware_trainer(dataset, base_model, staging_dir, settings)
    if trainer.is_world_process_zero():
        shutil.rmtree(staging_dir, ignore_errors=True)  # leftovers of a crashed run
    trainer.accelerator.wait_for_everyone()

    started = time.perf_counter()
    train_output = trainer.train()
    metrics = run_metrics(trainer, train_output, time.perf_counter() - started)
    trainer.log({f"final_{name}": value for name, value in metrics.items()})

    trainer.save_model(str(staging_dir))  # every process calls it (sharded setups gather here)
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(str(staging_dir))
        write_training_config(staging_dir, settings, base_model, rows_per_kind(dataset), metrics)
        publish_dir(staging_dir, output_dir)
    trainer.accelerator.wait_for_everyone()
    return TrainResult(adapter_dir=str(output_dir), metrics=metrics, settings=settings)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict. Values are JSON when they parse (numbers, bools, lists), else strings;
    a list field also accepts ``a,b,c``."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, separator, raw = pair.partition("=")
        if not separator or key not in TrainSettings.model_fields:
            raise SystemExit(f"--set expects key=value with key one of {sorted(TrainSettings.model_fields)}: {pair!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw.split(",") if key == "target_modules" else raw
        overrides[key] = value
    return overrides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="folder written by Dataset.save_to_disk")
    parser.add_argument("--base-model", required=True, help="model folder, hub id or embedded:<name>")
    parser.add_argument("--output-dir", required=True, help="where the adapter (or full model) goes")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a TrainSettings field")
    args = parser.parse_args(argv)

    from datasets import load_from_disk

    from mapd_dspy.models import resolve_model

    settings = TrainSettings.model_validate(parse_overrides(args.set))
    result = train(load_from_disk(args.dataset), resolve_model(args.base_model), args.output_dir, settings)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"adapter_dir": result.adapter_dir, "metrics": result.metrics}, indent=2))


if __name__ == "__main__":
    main()
