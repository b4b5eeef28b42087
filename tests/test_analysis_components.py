"""Component classification for the five families, and fused q/k/v slicing checked against what
the model itself feeds to attention (a capturing attention function, independent of the slicer)."""
import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from src.models.components import (ParamMeta, component_of, describe_parameters,
                                   fused_qkv_row_parts, layer_index)
from src.models.properties import attention_heads
from tests.conftest import load

# (family preset, {module-path suffix of a block parameter: component}, {non-block name: component})
FAMILIES = {
    "tiny-llama": ({"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_o",
                    "mlp.gate_proj": "mlp_gate", "mlp.up_proj": "mlp_up",
                    "mlp.down_proj": "mlp_down", "input_layernorm": "norm",
                    "post_attention_layernorm": "norm"},
                   {"model.embed_tokens.weight": "embedding", "model.norm.weight": "norm",
                    "lm_head.weight": "head"}),
    "tiny-gpt2": ({"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_o", "mlp.c_fc": "mlp_up",
                   "mlp.c_proj": "mlp_down", "ln_1": "norm", "ln_2": "norm"},
                  {"transformer.wte.weight": "embedding", "transformer.wpe.weight": "pos_embedding",
                   "transformer.ln_f.weight": "norm", "lm_head.weight": "head"}),
    "tiny-neox": ({"attention.query_key_value": "attn_qkv", "attention.dense": "attn_o",
                   "mlp.dense_h_to_4h": "mlp_up", "mlp.dense_4h_to_h": "mlp_down",
                   "input_layernorm": "norm", "post_attention_layernorm": "norm"},
                  {"gpt_neox.embed_in.weight": "embedding",
                   "gpt_neox.final_layer_norm.weight": "norm", "embed_out.weight": "head"}),
    "tiny-opt": ({"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                  "self_attn.v_proj": "attn_v", "self_attn.out_proj": "attn_o", "fc1": "mlp_up",
                  "fc2": "mlp_down", "self_attn_layer_norm": "norm", "final_layer_norm": "norm"},
                 {"model.decoder.embed_tokens.weight": "embedding",
                  "model.decoder.embed_positions.weight": "pos_embedding",
                  "model.decoder.final_layer_norm.weight": "norm", "lm_head.weight": "head"}),
}
FAMILIES["tiny-mistral"] = FAMILIES["tiny-llama"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    torch.manual_seed(0)
    return request.param, load(f"random:{request.param}").model


def test_every_parameter_of_each_family_is_classified(family):
    preset, model = family
    block_rules, top_level = FAMILIES[preset]
    n_layers = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") \
        else model.config.n_layer
    seen_layers = set()
    for name, _ in model.named_parameters(remove_duplicate=False):
        module_path = name.rsplit(".", 1)[0]
        layer = layer_index(name)
        if layer is None:
            if name in top_level:
                assert component_of(name) == top_level[name], name
            elif name.replace("embed_out", "lm_head") in top_level:  # neox head naming varies
                assert component_of(name) == "head", name
            else:
                assert component_of(name) in ("norm", "head", "embedding", "pos_embedding"), name
            continue
        seen_layers.add(layer)
        suffix = [s for s in block_rules if module_path.endswith("." + s)]
        assert len(suffix) == 1, f"{name}: no unique expectation"
        assert component_of(name) == block_rules[suffix[0]], name
    assert seen_layers == set(range(n_layers))
    assert "other" not in {component_of(n) for n, _ in model.named_parameters()}


def _capturing_forward(model, input_ids):
    """q, k, v of block 0 exactly as the model hands them to attention: [B, heads, L, head_dim]."""
    captured = []

    def capture(module, query, key, value, attention_mask, **kwargs):
        captured.append((query.detach().clone(), key.detach().clone(), value.detach().clone()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("cwa_capture", capture)
    saved = model.config._attn_implementation
    model.config._attn_implementation = "cwa_capture"
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        model.config._attn_implementation = saved
    return captured[0]


def _head_of(row, part, n_heads, head_dim, model_type):
    """Expected head, written out from the two layouts (concatenated / per head)."""
    if model_type == "gpt_neox":
        return row // (3 * head_dim)
    return (row - part * n_heads * head_dim) // head_dim


@pytest.mark.parametrize("preset,param", [("tiny-gpt2", "transformer.h.0.attn.c_attn"),
                                          ("tiny-neox", "gpt_neox.layers.0.attention.query_key_value")])
def test_fused_qkv_slices_match_what_attention_receives(preset, param):
    torch.manual_seed(0)
    model = load(f"random:{preset}").model
    meta = describe_parameters(model, [f"{param}.weight"])[f"{param}.weight"]
    n_heads, n_kv = attention_heads(model.config)
    parts = fused_qkv_row_parts(meta, model.config.model_type, n_heads, n_kv)
    bias = dict(model.named_parameters())[f"{param}.bias"]  # indexed by output row
    ids = torch.arange(1, 9).unsqueeze(0)
    reference = _capturing_forward(model, ids)
    n_out = meta.shape_out_in[0]
    head_dim = n_out // (3 * n_heads)
    assert parts.shape == (n_out,) and bias.shape == (n_out,)
    rows = [r for r in range(n_out) if r % head_dim in (0, head_dim - 1)]  # both edges of every slot
    for row in rows:
        with torch.no_grad():
            bias[row] += 1.0
        try:
            moved = [(a - b).abs().amax(dim=(0, 2, 3)) > 1e-6  # per head
                     for a, b in zip(_capturing_forward(model, ids), reference)]
        finally:
            with torch.no_grad():
                bias[row] -= 1.0
        changed = [bool(m.any()) for m in moved]
        assert changed.count(True) == 1, f"row {row} moved {changed}"
        part = changed.index(True)
        assert part == int(parts[row]), f"row {row}"
        assert moved[part].nonzero().flatten().tolist() == [_head_of(row, part, n_heads, head_dim,
                                                                      model.config.model_type)]
    assert torch.bincount(parts).tolist() == [n_out // 3] * 3
    assert [int(parts[0]), int(parts[n_out - 1])] == [0, 2]  # first row q, last row v


def test_concatenated_gqa_layout_and_unknown_layout():
    # Phi-3 style: 4 query heads, 2 kv heads, head_dim 3 -> 12 q rows, 6 k rows, 6 v rows
    meta = ParamMeta("x.qkv_proj.weight", 0, "attn_qkv", (24, 5), False)
    parts = fused_qkv_row_parts(meta, "phi3", 4, 2)
    assert parts.tolist() == [0] * 12 + [1] * 6 + [2] * 6
    assert fused_qkv_row_parts(meta, "some_new_model", 4, 2) is None
    with pytest.raises(ValueError):
        fused_qkv_row_parts(ParamMeta("y", 0, "attn_qkv", (25, 5), False), "phi3", 4, 2)
    # GPT-NeoX per-head: 2 heads, head_dim 2 -> [q q k k v v q q k k v v]
    neox = ParamMeta("z.query_key_value.weight", 0, "attn_qkv", (12, 4), False)
    assert fused_qkv_row_parts(neox, "gpt_neox", 2).tolist() == [0, 0, 1, 1, 2, 2] * 2
