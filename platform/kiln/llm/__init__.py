"""Causal-LM fine-tuning on kiln's one training loop.

    from kiln.llm import TrainerEngine, create_default_config
    config = create_default_config(model_path="models/tiny", dataset_path="chat.jsonl",
                                   output_dir="out/tiny-chat", num_epochs=3)
    result = TrainerEngine().run_job(config)      # TrainingResult(success, error, ...)

Config sections and validation (:mod:`kiln.llm.config`), data profiles
(:mod:`kiln.llm.profiles`), tokenization with prompt masking
(:mod:`kiln.llm.encoding`), model loading, LoRA and merging
(:mod:`kiln.llm.modeling`), generation, the status file, a tiny offline model
maker, and a Ray Serve ``/generate`` app (:mod:`kiln.llm.serve`).
"""

from kiln._lazy import lazy_exports

_EXPORTS = {
    "CausalLMFactory": "kiln.llm.modeling",
    "ConfigLoader": "kiln.llm.config",
    "DataProfile": "kiln.llm.profiles",
    "GenerationRequest": "kiln.llm.generate",
    "TrainerConfig": "kiln.llm.config",
    "TrainerEngine": "kiln.llm.engine",
    "TrainingResult": "kiln.llm.engine",
    "TrainingState": "kiln.llm.status",
    "TrainingStatusWriter": "kiln.llm.status",
    "build_generate_app": "kiln.llm.serve",
    "create_default_config": "kiln.llm.config",
    "encode_example": "kiln.llm.encoding",
    "generate": "kiln.llm.generate",
    "get_profile": "kiln.llm.profiles",
    "load_for_inference": "kiln.llm.modeling",
    "make_tiny_model": "kiln.llm.tiny",
    "merge_adapter": "kiln.llm.modeling",
    "read_status": "kiln.llm.status",
    "register_profile": "kiln.llm.profiles",
    "tune_llm": "kiln.llm.tune",
}

__all__ = [*sorted(_EXPORTS)]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
