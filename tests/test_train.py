"""Tests for mapd_dspy.finetune.train.

The loss tests use a tiny randomly initialised Llama (2 layers, width 16, vocabulary 64) rather than the embedded
SmolLM2: the weighting identity does not depend on the weights, the tiny model runs in milliseconds, and the real
model is exercised by the integration tests below. TRL's fused LM head computes in float32, hence the tolerances.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mapd_dspy.finetune.train import (
    KIND_IDS,
    TRAINING_CONFIG_FILE,
    TrainSettings,
    _make_kind_collator,
    batches_in_order,
    completion_nll_per_example,
    kind_example_weights,
    mistake_aware_loss,
    padding_fraction,
    parse_overrides,
    publish_dir,
    sampling_order,
    train,
)

REPO = Path(__file__).resolve().parents[1]
MISTAKE, RATIONALE = KIND_IDS["mistake"], KIND_IDS["rationale"]


# ---------------------------------------------------------------------------------------------------------
# Tiny model and batch


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()  # eval: no dropout, so two forwards agree
    add_fused_lm_head(model, outputs=("log_probs", "is_top1"))  # what SFTTrainer does to the model it trains
    return model


def tiny_batch() -> dict[str, torch.Tensor]:
    """Four right-padded rows: prompt tokens labelled -100, completion tokens labelled with themselves."""
    generator = torch.Generator().manual_seed(1)
    prompt_lengths, completion_lengths = [3, 5, 2, 4], [4, 2, 6, 3]
    kinds = [MISTAKE, RATIONALE, MISTAKE, RATIONALE]
    width = max(p + c for p, c in zip(prompt_lengths, completion_lengths))
    input_ids = torch.zeros(4, width, dtype=torch.long)
    labels = torch.full((4, width), -100)
    attention_mask = torch.zeros(4, width, dtype=torch.long)
    for row, (prompt_length, completion_length) in enumerate(zip(prompt_lengths, completion_lengths)):
        length = prompt_length + completion_length
        input_ids[row, :length] = torch.randint(1, 64, (length,), generator=generator)
        labels[row, prompt_length:length] = input_ids[row, prompt_length:length]
        attention_mask[row, :length] = 1
    kind_id = torch.tensor(kinds)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "kind_id": kind_id}


def model_inputs(batch: dict) -> dict:
    return {key: value for key, value in batch.items() if key != "kind_id"}


def reference_completion_losses(model, batch) -> torch.Tensor:
    """Per-example mean NLL, computed independently from the full logits at the completion positions only."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    log_probs = torch.log_softmax(logits, dim=-1)
    losses = []
    for row in range(batch["input_ids"].size(0)):
        positions = (batch["labels"][row] != -100).nonzero().flatten().tolist()
        # the token at position p is predicted from position p - 1
        token_nll = [-log_probs[row, p - 1, batch["labels"][row, p]] for p in positions]
        losses.append(torch.stack(token_nll).mean())
    return torch.stack(losses)


def gradients(model, loss) -> list[torch.Tensor]:
    parameters = [p for p in model.parameters() if p.requires_grad]
    return [g.detach().clone() for g in torch.autograd.grad(loss, parameters)]


def all_close(first, second) -> bool:
    return all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(first, second, strict=True))


# ---------------------------------------------------------------------------------------------------------
# The two-task loss


def test_per_example_losses_cover_completion_tokens_only(tiny_model):
    batch = tiny_batch()
    losses, _ = completion_nll_per_example(tiny_model, model_inputs(batch))
    assert torch.allclose(losses, reference_completion_losses(tiny_model, batch), rtol=1e-5)

    # Labelling the prompt as well changes the loss: the -100 prompt labels are what keeps it out.
    every_token_labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    all_token_batch = {**model_inputs(batch), "labels": every_token_labels}
    all_token_losses, _ = completion_nll_per_example(tiny_model, all_token_batch)
    assert not torch.allclose(losses, all_token_losses)


@pytest.mark.parametrize("mistake_weight", [1.0, 0.0, 0.5, 0.8])
def test_weighting_gives_the_gradient_of_the_weighted_task_losses(tiny_model, mistake_weight):
    batch = tiny_batch()
    is_mistake = batch["kind_id"] == MISTAKE

    example_losses, _ = completion_nll_per_example(tiny_model, model_inputs(batch))
    trained = gradients(tiny_model, mistake_aware_loss(example_losses, batch["kind_id"], mistake_weight))

    mistake_only = gradients(tiny_model, reference_completion_losses(tiny_model, batch)[is_mistake].mean())
    rationale_only = gradients(tiny_model, reference_completion_losses(tiny_model, batch)[~is_mistake].mean())
    expected = [mistake_weight * m + (1 - mistake_weight) * r for m, r in zip(mistake_only, rationale_only)]
    assert all_close(trained, expected)
    if mistake_weight == 1.0:
        assert all_close(trained, mistake_only)
    if mistake_weight == 0.0:
        assert all_close(trained, rationale_only)


def test_one_kind_batch_keeps_its_coefficient():
    mistakes_only = torch.tensor([MISTAKE, MISTAKE, MISTAKE])
    assert torch.allclose(kind_example_weights(mistakes_only, 0.25), torch.full((3,), 0.25 / 3))
    # a = 0: a batch of mistakes trains on nothing (a differentiable zero, not a NaN)
    losses = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    loss = mistake_aware_loss(losses, mistakes_only, 0.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(losses.grad, torch.zeros(3))


def test_mixed_batch_weights_sum_to_one():
    kinds = torch.tensor([MISTAKE, RATIONALE, RATIONALE, RATIONALE])
    weights = kind_example_weights(kinds, 0.3)
    assert torch.allclose(weights, torch.tensor([0.3, 0.7 / 3, 0.7 / 3, 0.7 / 3]))
    assert math.isclose(weights.sum().item(), 1.0, rel_tol=1e-6)


def test_collator_carries_kind_id_through_trl_padding():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = _make_kind_collator(DataCollatorForLanguageModeling(pad_token_id=0))
    batch = collate(
        [
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "kind_id": MISTAKE},
            {"input_ids": [8, 9], "labels": [-100, 9], "kind_id": RATIONALE},
        ]
    )
    assert batch["kind_id"].tolist() == [MISTAKE, RATIONALE]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]  # padded to the batch, not to max_length


def test_trainer_divides_the_loss_by_accumulation_steps():
    from mapd_dspy.finetune.train import _sft_trainer_class

    # A per-example mean is not normalised by the step's token count, so Trainer must do the GA division.
    assert _sft_trainer_class().loss_is_scaled_for_ga is False


# ---------------------------------------------------------------------------------------------------------
# Padding


def test_padding_fraction_on_hand_made_batches():
    assert padding_fraction([[3, 5], [4]]) == pytest.approx(2 / 14)  # (5+5 + 4) padded, 12 real
    assert padding_fraction([[7, 7, 7]]) == 0.0
    assert padding_fraction([]) == 0.0
    assert batches_in_order([1, 2, 3, 4, 5], [4, 0, 2, 1, 3], 2) == [[5, 1], [3, 2], [4]]


def test_group_by_length_pads_less_than_random_order_on_skewed_lengths():
    generator = torch.Generator().manual_seed(3)
    # Like MAPD data: many short rationales, some long mistake explanations.
    short = torch.randint(60, 120, (150,), generator=generator).tolist()
    long = torch.randint(250, 500, (50,), generator=generator).tolist()
    lengths = short + long

    def fraction(group_by_length: bool) -> float:
        order = sampling_order(lengths, batch_size=8, group_by_length=group_by_length, seed=0)
        assert sorted(order) == list(range(len(lengths)))  # a permutation: every row once per epoch
        return padding_fraction(batches_in_order(lengths, order, 8))

    grouped, shuffled = fraction(True), fraction(False)
    assert grouped < shuffled / 2, (grouped, shuffled)


# ---------------------------------------------------------------------------------------------------------
# Settings, CLI parsing, saving


def test_parse_overrides_types_values():
    overrides = parse_overrides(
        ["max_steps=3", "mistake_weight=0.7", "group_by_length=false", "target_modules=q_proj,v_proj", "method=full"]
    )
    settings = TrainSettings.model_validate(overrides)
    assert (settings.max_steps, settings.mistake_weight, settings.group_by_length) == (3, 0.7, False)
    assert settings.target_modules == ["q_proj", "v_proj"] and settings.method == "full"
    with pytest.raises(SystemExit):
        parse_overrides(["no_such_field=1"])


def test_settings_reject_unknown_and_out_of_range_fields():
    with pytest.raises(ValueError):
        TrainSettings(mistake_weight=1.5)
    with pytest.raises(ValueError):
        TrainSettings.model_validate({"max_seq_length": 512})


def test_publish_dir_replaces_an_older_folder(tmp_path):
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "old.txt").write_text("old")
    staging = tmp_path / ".adapter.partial"
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    publish_dir(staging, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# ---------------------------------------------------------------------------------------------------------
# Integration: real TRL runs on the embedded SmolLM2


def tiny_training_rows() -> list[dict]:
    """Hand-written MAPD-style rows: three rationales and three mistake explanations."""
    system = {"role": "system", "content": "You are a careful student who solves math word problems step by step."}
    rows = []
    for index, (question, rationale, answer) in enumerate(
        [
            ("Sam has 3 apples and buys 4 more. How many apples?", "3 + 4 = 7.", 7),
            ("A box holds 6 eggs. How many eggs are in 5 boxes?", "Each box has 6 eggs, so 5 * 6 = 30.", 30),
            ("Mia had 20 stickers and gave away 8. How many are left?", "20 - 8 = 12 stickers remain.", 12),
        ]
    ):
        user = {"role": "user", "content": f"Question: {question}"}
        rows.append(
            {
                "prompt": [system, user],
                "completion": [{"role": "assistant", "content": f"{rationale} The answer is {answer}."}],
                "kind": "rationale",
                "example_id": f"q{index}",
                "teacher": "teacher-a",
            }
        )
        wrong_answer = f"Your answer was {answer + 1}. Explain the mistake."
        mistake_prompt = {"role": "user", "content": f"Question: {question}\n{wrong_answer}"}
        explanation = (
            f"The earlier answer {answer + 1} is off by one: the step that combines the numbers was miscounted. "
            f"Redoing it carefully, {rationale} So the correct answer is {answer}, not {answer + 1}."
        )
        rows.append(
            {
                "prompt": [system, mistake_prompt],
                "completion": [{"role": "assistant", "content": explanation}],
                "kind": "mistake",
                "example_id": f"q{index}",
                "teacher": "teacher-b",
            }
        )
    return rows


def assert_adapter_folder(folder: Path) -> dict:
    assert (folder / "adapter_config.json").is_file()
    assert (folder / "adapter_model.safetensors").is_file()
    assert (folder / "tokenizer_config.json").is_file()
    config = json.loads((folder / TRAINING_CONFIG_FILE).read_text())
    assert config["rows_per_kind"] == {"rationale": 3, "mistake": 3}
    assert not folder.with_name(f".{folder.name}.partial").exists()
    return config


@pytest.mark.integration
def test_lora_run_saves_an_adapter(embedded_student_dir, tmp_path):
    from datasets import Dataset

    settings = TrainSettings(max_steps=3, batch_size=2, max_length=256)
    result = train(Dataset.from_list(tiny_training_rows()), embedded_student_dir, tmp_path / "adapter", settings)

    config = assert_adapter_folder(Path(result.adapter_dir))
    assert config["base_model"] == embedded_student_dir and config["settings"]["max_steps"] == 3
    assert math.isfinite(result.metrics["train_loss"]) and result.metrics["train_loss"] > 0
    assert result.metrics["steps"] == 3
    assert 0.0 <= result.metrics["padding_fraction"] < 1.0
    assert result.metrics["tokens_per_second"] > 0


@pytest.mark.integration
def test_accelerate_launch_on_one_cpu_process(embedded_student_dir, tmp_path):
    from datasets import Dataset

    dataset_dir = tmp_path / "dataset"
    Dataset.from_list(tiny_training_rows()).save_to_disk(str(dataset_dir))
    output_dir = tmp_path / "adapter"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "finetune" / "accelerate_cpu.yaml"),
        "-m", "mapd_dspy.finetune.train",
        "--dataset", str(dataset_dir),
        "--base-model", embedded_student_dir,
        "--output-dir", str(output_dir),
        "--set", "max_steps=1", "--set", "batch_size=2", "--set", "max_length=256",
    ]  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert_adapter_folder(output_dir)
