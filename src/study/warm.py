"""Imported once, by the study's fork server only (src/study/execute.py): everything a run
imports that takes seconds (the tool, torch, transformers' auto classes and the common model
code), so that each forked run starts at once. The fork server also ends when the study
process does (multiprocessing's server outlives a killed parent), and its runs with it."""
import importlib

from src.study.execute import die_with_parent

MODULES = ("src.cli", "src.pipeline", "transformers", "transformers.models.auto.modeling_auto",
           "transformers.models.auto.tokenization_auto", "transformers.models.llama.modeling_llama",
           "transformers.models.gpt2.modeling_gpt2")

die_with_parent()
for name in MODULES:
    importlib.import_module(name)
