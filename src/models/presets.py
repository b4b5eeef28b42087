"""Named configurations for randomly initialised models (``--model random:<preset>``).

They cover other architectures in tests (the ``tiny-*`` shapes) and full-size shapes for
benchmarks and memory estimates (``gpt2``, ``llama-3.1-8b``, ``llama-3.1-70b``,
``mistral-7b``). ``vocab_size=None`` means "the size of the tokenizer in use", so token ids
always fit the embedding.
"""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    "gpt2": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                 vocab_size=50257),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         vocab_size=128256, tie_word_embeddings=False),
    "llama-3.1-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672,
                          num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                          max_position_embeddings=131072, rope_theta=500000.0,
                          rms_norm_eps=1e-5, vocab_size=128256, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-5,
                       vocab_size=32768, sliding_window=None, tie_word_embeddings=False),
    "tiny-gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512,
                      vocab_size=None),
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, vocab_size=None, tie_word_embeddings=False),
    "tiny-mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, sliding_window=None, vocab_size=None,
                         tie_word_embeddings=False),
    "tiny-neox": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                      vocab_size=None, use_parallel_residual=True),
    "tiny-opt": dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=64,
                     vocab_size=None),
}
