"""LLM data path without Ray: profiles, chat template, label masking, truncation,
packing, collators, DataLoaderFactory and UniversalDataModule."""

from __future__ import annotations

import json

import pytest
import torch

from kiln.config import TaskSpec
from kiln.data import DataLoaderConfig, DataLoaderFactory, UniversalDataModule
from kiln.data.collate import CollatorRegistry, get_collator, register_collator
from kiln.errors import DatasetError, NotFoundError
from kiln.llm.chat import BUILTIN_CHAT_TEMPLATE, END_OF_TURN, ensure_chat_template
from kiln.llm.encoding import encode_example, encode_examples
from kiln.llm.profiles import get_profile, prepare_examples, read_rows, register_profile

QA = [("What is the capital of France?", "Paris"), ("Two plus two?", "four")]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from kiln.llm.modeling import load_tokenizer
    from kiln.llm.tiny import make_tiny_model

    texts = [f"{q} {a}" for q, a in QA] + ["some plain text to learn from."]
    path = make_tiny_model(tmp_path_factory.mktemp("tiny"), texts, hidden_size=32, vocab_size=300)
    return load_tokenizer(path)


def _chat(q, a, system=None):
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": ([{"role": "system", "content": system}] if system else []) + messages}


# --- profiles ---------------------------------------------------------------------


def test_builtin_profiles_transform_rows():
    chat = get_profile("chat").transform_example(_chat("hi", "yo"), 0, "Be brief.")
    assert chat["messages"][0] == {"role": "system", "content": "Be brief."}
    inst = get_profile("instruction").transform_example(
        {"instruction": "Translate", "input": "chat", "output": "cat"}, 0, ""
    )
    assert inst["messages"] == [
        {"role": "user", "content": "Translate\n\nchat"},
        {"role": "assistant", "content": "cat"},
    ]
    comp = get_profile("completion").transform_example({"prompt": "a", "completion": "b"}, 0, "")
    assert comp == {"prompt": "a", "completion": "b"}
    assert get_profile("text").transform_example({"text": "t"}, 0, "") == {"text": "t"}
    assert get_profile("text", text_key="body").transform_example({"body": "x"}, 0, "") == {
        "text": "x"
    }
    with pytest.raises(NotFoundError, match="unknown profile 'nope'.*chat"):
        get_profile("nope")


def test_register_profile_is_looked_up_by_name():
    class Upper:
        name = "upper"

        def problems(self, example):
            return [] if "t" in example else ["field 't' is missing"]

        def transform_example(self, example, idx, system_prompt):
            return {"text": example["t"].upper()}

    register_profile("upper", Upper(), overwrite=True)
    assert get_profile("upper").transform_example({"t": "ab"}, 0, "") == {"text": "AB"}
    with pytest.raises(TypeError, match="problems"):
        register_profile("broken", object())


def test_invalid_rows_are_reported_by_line_and_field(tmp_path):
    path = tmp_path / "rows.jsonl"
    lines = [
        json.dumps(_chat("q", "a")),
        "",
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps(_chat("q2", "a2")),
    ]
    path.write_text("\n".join(lines) + "\n")
    rows = read_rows(path)
    with pytest.raises(DatasetError) as info:
        prepare_examples(rows, get_profile("chat"))
    message = str(info.value)
    assert "3 of 5 rows" in message
    assert "line 3: messages[0].role='robot'" in message
    assert "line 4: not valid JSON" in message
    assert "line 5: field 'messages' has no 'assistant' message" in message
    kept = prepare_examples(rows, get_profile("chat"), skip_invalid=True)
    assert len(kept.examples) == 2 and len(kept.invalid) == 3


def test_no_valid_rows_is_an_error_even_when_skipping(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(DatasetError, match="no valid rows.*line 1: field 'completion' is missing"):
        prepare_examples(read_rows(path), get_profile("completion"), skip_invalid=True)


def test_read_rows_json_parquet_and_datasets_folder(tmp_path):
    import datasets
    import pandas as pd

    rows = [{"text": "a"}, {"text": "b"}]
    (tmp_path / "r.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "r.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for source in ("r.json", "r.parquet", "saved"):
        assert read_rows(tmp_path / source) == [(1, {"text": "a"}), (2, {"text": "b"})]


# --- tokenization -------------------------------------------------------------------


def test_chat_labels_cover_exactly_the_assistant_reply(tokenizer):
    q, a = QA[0]
    enc = encode_example(_chat(q, a, system="Be brief."), tokenizer, max_length=256)
    assert not enc.truncated and len(enc.input_ids) == len(enc.labels)
    counted = [t for t in enc.labels if t != -100]
    reply = tokenizer(a + END_OF_TURN + "\n", add_special_tokens=False)["input_ids"]
    assert counted == reply  # the reply, its end marker and newline; nothing of the prompt
    n = len(enc.labels)
    assert enc.labels[n - len(reply) :] == enc.input_ids[n - len(reply) :]
    assert all(t == -100 for t in enc.labels[: n - len(reply)])


def test_multi_turn_masks_every_non_assistant_turn(tokenizer):
    messages = [
        {"role": "user", "content": QA[0][0]},
        {"role": "assistant", "content": QA[0][1]},
        {"role": "user", "content": QA[1][0]},
        {"role": "assistant", "content": QA[1][1]},
    ]
    enc = encode_example({"messages": messages}, tokenizer, max_length=256)
    text = tokenizer.decode([t for t in enc.labels if t != -100])
    assert text == f"{QA[0][1]}{END_OF_TURN}\n{QA[1][1]}{END_OF_TURN}\n"


def test_completion_and_text_labels(tokenizer):
    enc = encode_example({"prompt": "Two plus two? ", "completion": "four"}, tokenizer, 64)
    # The token that straddles the prompt's end (" f") counts: it holds completion text.
    completion = tokenizer.decode([t for t in enc.labels if t != -100])
    assert completion == " four" + tokenizer.eos_token
    text = encode_example({"text": "some plain text"}, tokenizer, 64)
    assert text.labels == text.input_ids and text.input_ids[-1] == tokenizer.eos_token_id


def test_truncation_is_counted_and_label_free_sequences_dropped(tokenizer):
    long_prompt = _chat(" ".join(["What is the capital of France?"] * 20), "Paris")
    examples = [long_prompt, _chat(*QA[1]), {"text": "some plain text " * 20}]
    seqs, stats = encode_examples(examples, tokenizer, max_length=30)
    assert all(len(s.input_ids) <= 30 for s in seqs)
    assert stats.truncated == 2  # the long chat and the long text
    assert stats.dropped_no_labels == 1  # the long chat lost its reply
    assert stats.sequences == 2


def test_packing_fills_blocks(tokenizer):
    examples = [_chat(q, a) for q, a in QA] * 5
    plain, _ = encode_examples(examples, tokenizer, 64)
    packed, stats = encode_examples(examples, tokenizer, 64, packing=True)
    assert stats.packed_from == 10 and len(packed) < len(plain)
    assert sum(len(s.input_ids) for s in packed) == sum(len(s.input_ids) for s in plain)
    assert all(len(s.input_ids) == 64 for s in packed[:-1])


def test_builtin_template_installed_only_when_missing(tokenizer):
    assert tokenizer.chat_template == BUILTIN_CHAT_TEMPLATE
    assert ensure_chat_template(tokenizer) is False  # it has one: untouched


# --- collators and loaders ----------------------------------------------------------


def test_language_modeling_collator_hf_keys_exclude_padding():
    batch = get_collator("language_modeling")(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
        pad_token_id=0,
        input_key="input_ids",
        label_key="labels",
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_each_builtin_collator_by_name():
    cls = get_collator("classification")([([1, 2], 0), ([3], 1)], pad_token_id=9)
    assert cls["x"].tolist() == [[1, 2], [3, 9]] and cls["attention_mask"].tolist() == [
        [1, 1],
        [1, 0],
    ]
    vis = get_collator("vision")([(torch.zeros(1, 2, 2), 0), (torch.ones(1, 3, 3), 1)])
    assert vis["x"].shape == (2, 1, 3, 3)
    s2s = get_collator("sequence_to_sequence")([([1, 2, 3], [4]), ([5], [6, 7])])
    assert s2s["y"].tolist() == [[4, -100], [6, 7]] and s2s["x"].shape == (2, 3)


def test_registry_is_module_level():
    register_collator("llm_test_custom", lambda b: {"x": torch.zeros(len(b))}, overwrite=True)
    assert "llm_test_custom" in CollatorRegistry()  # any view sees it
    task = TaskSpec.classification(
        num_classes=2, preprocessing_config={"collator": "llm_test_custom"}
    )
    loader = DataLoaderFactory(task).create_loader([1, 2, 3], DataLoaderConfig(batch_size=3))
    assert next(iter(loader))["x"].shape == (3,)


def test_dataloader_factory_order_depends_only_on_seed():
    task = TaskSpec.classification(num_classes=2)
    data = [(torch.tensor([float(i)]), i % 2) for i in range(20)]

    def order(seed):
        loader = DataLoaderFactory(task, seed=seed).create_loader(data, DataLoaderConfig(4))
        return [b["x"].flatten().tolist() for b in loader]

    assert order(1) == order(1)
    assert order(1) != order(2)
    flat = sorted(v for batch in order(1) for v in batch)
    assert flat == [float(i) for i in range(20)]
    eval_loader = DataLoaderFactory(task, seed=1).create_loader(
        data, DataLoaderConfig(8, shuffle=True, drop_last=True), is_eval=True
    )
    assert [len(b["y"]) for b in eval_loader] == [8, 8, 4]  # eval: in order, nothing dropped


# --- UniversalDataModule -------------------------------------------------------------


def test_universal_data_module_from_file_and_saved_folder(tmp_path):
    import datasets

    rows = [{"x": [float(i), 1.0], "y": i % 3} for i in range(30)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    module = UniversalDataModule(TaskSpec.classification(num_classes=3), batch_size=8, seed=0)
    train, val = module.load_from_file(path, validation_split=0.2)
    assert len(train.dataset) == 24 and len(val.dataset) == 6
    batch = next(iter(train))
    assert batch["x"].shape == (8, 2) and batch["y"].dtype == torch.long

    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:20]), "test": datasets.Dataset.from_list(rows)}
    ).save_to_disk(str(saved))
    train, val = module.load_huggingface(str(saved), validation_split="test", max_samples=10)
    assert len(train.dataset) == 10 and len(val.dataset) == 10
    with pytest.raises(DatasetError, match="train_split='nope'.*splits"):
        module.load_huggingface(str(saved), train_split="nope")


def test_universal_data_module_tokenizes_text_for_language_modeling(tmp_path, tokenizer):
    path = tmp_path / "text.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"{q} {a}"}) for q, a in QA))
    task = TaskSpec.language_modeling(
        pad_token_id=tokenizer.pad_token_id, input_column="input_ids", label_column="labels"
    )
    module = UniversalDataModule(task, batch_size=2, tokenizer=tokenizer)
    train, val = module.load_from_file(path, validation_split=0.0)
    assert val is None
    batch = next(iter(train))
    assert set(batch) == {"input_ids", "labels", "attention_mask"}


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    module = UniversalDataModule(TaskSpec.classification(num_classes=2))
    with pytest.raises(DatasetError, match="could not be loaded.*offline.*save_to_disk"):
        module.load_huggingface("kiln-test/surely-not-cached")
