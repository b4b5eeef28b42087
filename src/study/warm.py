"""Imported once by the study's fork server (src/study/execute.py): everything a run imports
that takes seconds (the tool, torch, transformers' auto classes and the common model code), so
that each forked run starts at once."""
import importlib

MODULES = ("src.cli", "src.pipeline", "transformers", "transformers.models.auto.modeling_auto",
           "transformers.models.auto.tokenization_auto", "transformers.models.llama.modeling_llama",
           "transformers.models.gpt2.modeling_gpt2")

for name in MODULES:
    importlib.import_module(name)
