"""Causal-LM fine-tuning through kiln's Trainer: a tiny Llama-style model made here
(tokenizer trained on the test's own text) learns a few dozen chat answers; LoRA on
that trained model learns new ones; DDP over 2 Ray workers; /generate on Ray Serve."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from kiln.engine.callbacks import CallbackBase
from kiln.llm import (
    TrainerEngine,
    TrainingStatusWriter,
    create_default_config,
    generate,
    load_for_inference,
)
from kiln.paths import RunPaths
from kiln.serve._ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "maple",
    "ocean",
    "lemon",
    "violet",
    "copper",
    "falcon",
    "meadow",
    "ember",
    "harbor",
    "quartz",
    "willow",
    "canyon",
    "orbit",
    "pepper",
    "saddle",
    "tundra",
    "velvet",
    "walnut",
    "zephyr",
]
QA = [(f"What is the code word number {i}?", w) for i, w in enumerate(WORDS)]
NEW_QA = [(q, WORDS[(i + 7) % len(WORDS)]) for i, (q, _) in enumerate(QA)]


def _write_chat(path: Path, pairs) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in pairs
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _answered(model_dir, pairs) -> int:
    model, tokenizer = load_for_inference(model_dir)
    return sum(
        generate(model, tokenizer, messages=[{"role": "user", "content": q}], max_new_tokens=8)[
            "text"
        ]
        == a
        for q, a in pairs
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Full fine-tune of a random tiny model on 24 chat QA pairs, with a status poller."""
    from kiln.llm.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("llm")
    base = make_tiny_model(root / "base", [f"{q} {a}" for q, a in QA], vocab_size=400)
    data = _write_chat(root / "chat.jsonl", QA)
    status_path = root / "status.json"
    config = create_default_config(
        model_path=str(base),
        dataset_path=str(data),
        output_dir=str(root / "full"),
        num_epochs=60,
        learning_rate=5e-3,
        batch_size=8,
        lr_scheduler="constant",
        logging_steps=5,
    )
    polled, torn, stop = [], [], threading.Event()

    def poll():  # until the job ends (completed or failed), or the test gives up
        while not stop.is_set():
            try:
                polled.append(json.loads(status_path.read_text())["state"])
            except FileNotFoundError:
                continue
            except ValueError as exc:
                torn.append(exc)
                continue
            if polled[-1] in ("completed", "failed"):
                return
            time.sleep(0.001)  # poll hard, but leave the GIL to the training loop

    reader = threading.Thread(target=poll, daemon=True)
    reader.start()
    paths = RunPaths.resolve(root / "home")
    try:
        result = TrainerEngine(TrainingStatusWriter(status_path), paths=paths).run_job(config)
    finally:
        reader.join(30)
        stop.set()
    assert result.success, result.error
    return {
        "root": root,
        "base": base,
        "result": result,
        "status": status_path,
        "polled": polled,
        "torn": torn,
        "paths": paths,
        "full": root / "full",
    }


def test_full_finetune_answers_the_memorised_questions(trained):
    result = trained["result"]
    assert result.global_step == 60 * 3 and result.final_loss < 0.5
    assert _answered(trained["full"], QA) >= 0.9 * len(QA)
    # Plain transformers loads the output, chat template included.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(trained["full"])
    tokenizer = AutoTokenizer.from_pretrained(trained["full"])
    assert "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )
    # The run is recorded like any other kiln run.
    assert result.summary["run_id"] is not None and trained["paths"].db.is_file()


def test_status_file_was_valid_json_whenever_read(trained):
    assert not trained["torn"]
    assert {"training", "completed"} <= set(trained["polled"])
    final = json.loads(trained["status"].read_text())
    assert final["state"] == "completed" and final["step"] == 180 and final["total_steps"] == 180
    assert final["tokens_per_s"] > 0 and final["learning_rate"] == pytest.approx(5e-3)


def _lora_config(trained, out: str, epochs: int, **extra):
    return create_default_config(
        model_path=str(trained["full"]),
        dataset_path=str(_write_chat(trained["root"] / "new.jsonl", NEW_QA)),
        output_dir=str(trained["root"] / out),
        num_epochs=epochs,
        learning_rate=1e-2,
        batch_size=4,
        lr_scheduler="constant",
        lora={"r": 8, "alpha": 16, "dropout": 0.0},
        run_name=out,
        **extra,
    )


def test_lora_on_the_trained_model_learns_and_leaves_the_base_alone(trained):
    weights = trained["full"] / "model.safetensors"
    before = _sha(weights)
    engine = TrainerEngine(paths=trained["paths"])
    result = engine.run_job(_lora_config(trained, "lora", 12))
    assert result.success, result.error
    history = result.summary["history"]
    assert history[-1]["train_loss"] <= 0.5 * history[0]["train_loss"]
    assert _sha(weights) == before  # base weights bit for bit
    adapter = trained["root"] / "lora" / "adapter_model.safetensors"
    assert adapter.stat().st_size < 0.1 * weights.stat().st_size
    checkpoint = Path(result.last_checkpoint_path) / "model.pt"
    assert checkpoint.stat().st_size < 0.1 * weights.stat().st_size  # adapter only
    assert 0 < result.summary["trainable_params"] < 0.1 * result.summary["total_params"]

    resumed = engine.run_job(
        _lora_config(trained, "lora", 14, merge=True, register_as="tiny-lora"),
        resume_from="latest",
    )
    assert resumed.success, resumed.error
    from kiln.tracking import ModelRegistry

    registry = ModelRegistry(trained["paths"].db, trained["paths"].artifacts)
    try:
        entry = registry.get_model(model_id=resumed.summary["model_id"])
    finally:
        registry.close()
    assert entry.name == "tiny-lora" and entry.config["kind"] == "lora_adapter"
    assert entry.config["base_model"] == str(trained["full"].resolve())
    assert (Path(entry.checkpoint_path) / "adapter_config.json").is_file()
    assert resumed.global_step == result.global_step + 2 * 6  # 24 rows / batch 4 per epoch
    assert [h["epoch"] for h in resumed.summary["history"]] == list(range(1, 15))

    merged = Path(resumed.summary["merged_dir"])
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(merged)  # a plain model folder
    lora_answers = _answered(trained["root"] / "lora", NEW_QA)
    assert _answered(merged, NEW_QA) == lora_answers


class _DumpTrainable(CallbackBase):
    """Saves each rank's trainable parameters when training ends."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, logs=None) -> None:
        inner = getattr(self.model, "module", self.model)
        state = {n: p.detach().cpu() for n, p in inner.named_parameters() if p.requires_grad}
        torch.save(state, Path(self.folder) / f"rank{self.rank}.pt")


def test_ddp_two_workers_keep_lora_adapters_identical(trained, ray_local):
    import ray.cloudpickle

    # Workers cannot import this test module by name: ship its hook class by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    dump = trained["root"] / "ranks"
    dump.mkdir()
    engine = TrainerEngine(paths=trained["paths"], hooks=[_DumpTrainable(str(dump))])
    # Step evaluations and a mid-epoch checkpoint too: both are collectives across ranks.
    config = _lora_config(
        trained, "lora-ddp", 3, num_workers=2, tracking=False, validation_split=0.25,
        eval_steps=1, save_steps=2,
    )  # fmt: skip
    result = engine.run_job(config)
    assert result.success, result.error
    assert result.summary["world_size"] == 2
    first = result.summary["history"][0]
    assert [e["step"] for e in first["evals"]] == list(range(1, first["global_step"]))
    manifest = json.loads((Path(result.last_checkpoint_path).parent / "manifest.json").read_text())
    assert any("_step_" in save["name"] for save in manifest["history"])
    rank0, rank1 = (torch.load(dump / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and any("lora_A" in k for k in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


def test_generate_on_ray_serve(trained, ray_local):
    import httpx
    from ray import serve

    from kiln.llm.modeling import CausalLMFactory, load_tokenizer, save_output
    from kiln.llm.serve import build_generate_app
    from kiln.serve.runner import start_serve

    # A fresh LoRA adapter (B starts at zero) answers exactly as its base model does.
    adapter = trained["root"] / "fresh-adapter"
    peft_model = CausalLMFactory(str(trained["full"]), lora={"r": 4, "alpha": 8})()
    save_output(peft_model, load_tokenizer(trained["full"]), adapter, base=str(trained["full"]))
    port = free_port()
    start_serve(host="127.0.0.1", port=port, ingress="proxy")
    serve.run(
        build_generate_app(trained["full"], num_cpus=0.25, max_body_bytes=4096),
        name="llm",
        route_prefix="/",
    )
    # The adapter app as `kiln serve ADAPTER_DIR` builds it, with an API key.
    from kiln.cli import build_parser
    from kiln.cli.serve import _build, _options

    args = build_parser().parse_args(["serve", str(adapter), "--num-cpus", "0.25"])
    options = {**_options(args, {}), "api_key_sha256": hashlib.sha256(b"k" * 16).hexdigest()}
    serve.run(_build(adapter, options, args), name="adapter", route_prefix="/adapter")
    auth = {"Authorization": "Bearer " + "k" * 16}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            question, answer = QA[3]
            ok = client.post(
                "/generate",
                json={"messages": [{"role": "user", "content": question}], "max_new_tokens": 8},
            )
            assert ok.status_code == 200 and ok.json()["text"] == answer
            raw = client.post("/generate", json={"prompt": "What", "max_new_tokens": 3})
            assert raw.status_code == 200 and raw.json()["completion_tokens"] <= 3
            assert client.get("/healthz").json()["status"] == "ok"
            assert client.get("/metadata").json()["kind"] == "causal_lm"
            assert client.post("/generate", content=b"{nope").status_code == 400
            bad = client.post("/generate", json={"prompt": "x", "temperature": -1})
            assert bad.status_code == 422 and "temperature=-1" in bad.json()["error"]
            both = client.post("/generate", json={"prompt": "x", "messages": []})
            assert both.status_code == 422
            assert client.post("/generate", content=b"x" * 5000).status_code == 413
            assert client.get("/generate").status_code == 405
            assert client.get("/nope").status_code == 404
            meta = client.get("/adapter/metadata", headers=auth).json()
            assert meta["kind"] == "lora_adapter" and meta["base_model"] == str(
                trained["full"].resolve()
            )
            body = {"messages": [{"role": "user", "content": question}], "max_new_tokens": 8}
            assert client.post("/adapter/generate", json=body).status_code == 401
            assert client.get("/adapter/healthz").status_code == 200  # no key needed
            via_adapter = client.post("/adapter/generate", json=body, headers=auth)
            assert via_adapter.status_code == 200 and via_adapter.json()["text"] == answer
    finally:
        serve.shutdown()
