"""Parameter name -> (layer index, component) for every supported architecture.

One ordered rule table serves GPT-2, Llama, Mistral, GPT-NeoX and OPT (and most other Hugging
Face causal LMs, whose names follow one of these schemes). Components:

    embedding, pos_embedding, attn_q, attn_k, attn_v, attn_o, attn_qkv (fused q/k/v),
    mlp_gate, mlp_up, mlp_down, norm, head, other

Coordinates: every table this project writes uses the ``nn.Linear`` convention [out, in].
GPT-2 stores ``Conv1D`` weights as [in, out]; ``ParamMeta.transposed`` marks them so that
``to_out_in`` can convert a flat index of the stored tensor to (row=out, col=in).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# (regex searched in the parameter's module path, component). First match wins.
COMPONENT_RULES: list[tuple[str, str]] = [
    (r"(^|\.)(wpe|embed_positions)$", "pos_embedding"),
    (r"(^|\.)(wte|embed_tokens|embed_in|word_embeddings)$", "embedding"),
    (r"(^|\.)(lm_head|embed_out)$", "head"),
    (r"(c_attn|query_key_value|qkv_proj|Wqkv)$", "attn_qkv"),
    (r"(q_proj|\.query)$", "attn_q"),
    (r"(k_proj|\.key)$", "attn_k"),
    (r"(v_proj|\.value)$", "attn_v"),
    (r"(o_proj|out_proj|attn\.c_proj|attention\.dense)$", "attn_o"),
    (r"(gate_proj|w1)$", "mlp_gate"),
    (r"(up_proj|c_fc|dense_h_to_4h|fc1|w3)$", "mlp_up"),
    (r"(down_proj|mlp\.c_proj|dense_4h_to_h|fc2|w2)$", "mlp_down"),
    (r"(norm|ln_\d|ln_f|layer_norm|layernorm)$", "norm"),
]

COMPONENTS = ["embedding", "pos_embedding", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_o",
              "mlp_gate", "mlp_up", "mlp_down", "norm", "head", "other"]

_LAYER_RE = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_index(param_name: str) -> int | None:
    """Transformer block index of a parameter, or None outside the block stack."""
    match = _LAYER_RE.search("." + param_name)
    return int(match.group(1)) if match else None


def component_of(param_name: str) -> str:
    """Component label of a parameter name (see module docstring)."""
    module_path = param_name.rsplit(".", 1)[0] if "." in param_name else param_name
    for pattern, component in COMPONENT_RULES:
        if re.search(pattern, module_path):
            return component
    return "other"


@dataclass(frozen=True)
class ParamMeta:
    name: str
    layer: int | None
    component: str
    stored_shape: tuple[int, ...]
    transposed: bool  # True for GPT-2 Conv1D: stored [in, out]

    @property
    def shape_out_in(self) -> tuple[int, ...]:
        if self.transposed:
            return (self.stored_shape[1], self.stored_shape[0])
        return self.stored_shape


def describe_parameters(model: torch.nn.Module, names) -> dict[str, ParamMeta]:
    """ParamMeta for each requested parameter name, in the given order."""
    owners = _owning_modules(model)
    params = dict(model.named_parameters())
    metas = {}
    for name in names:
        module = owners[name]
        transposed = type(module).__name__ == "Conv1D" and name.endswith("weight")
        metas[name] = ParamMeta(name, layer_index(name), component_of(name),
                                tuple(params[name].shape), transposed)
    return metas


def _owning_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    owners = {}
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            owners[full] = module
    return owners


def to_out_in(meta: ParamMeta, flat_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) in the [out, in] convention for flat indices into the stored tensor."""
    if len(meta.stored_shape) < 2:
        return flat_idx.clone(), torch.zeros_like(flat_idx)
    n_cols_stored = meta.stored_shape[-1]
    first, second = flat_idx // n_cols_stored, flat_idx % n_cols_stored
    if meta.transposed:
        return second, first
    return first, second


def from_out_in(meta: ParamMeta, row: int, col: int) -> int:
    """Flat index into the stored tensor of [out, in] coordinates (inverse of ``to_out_in``)."""
    if meta.transposed:
        return row + col * meta.stored_shape[-1]
    return row * meta.stored_shape[-1] + col


# model_type -> layout of the output rows of its fused q/k/v weight (see fused_qkv_row_parts).
FUSED_QKV_LAYOUTS: dict[str, str] = {
    "gpt2": "concatenated", "phi3": "concatenated", "mpt": "concatenated",
    "gpt_neox": "per_head", "bloom": "per_head",
}


def fused_qkv_row_parts(meta: ParamMeta, model_type: str, n_heads: int,
                        n_kv_heads: int | None = None) -> torch.Tensor | None:
    """Part of every output row of a fused q/k/v weight: LongTensor [n_out], 0=q, 1=k, 2=v.

    ``concatenated`` (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``): rows are [q; k; v] with
    n_heads*head_dim query rows and n_kv_heads*head_dim rows each for k and v.
    ``per_head`` (GPT-NeoX/Bloom ``query_key_value``): rows are [head, (q, k, v), head_dim].
    Returns None for a model type whose layout is not known (the weight stays ``attn_qkv``).
    """
    layout = FUSED_QKV_LAYOUTS.get(model_type)
    if layout is None:
        return None
    n_kv_heads = n_kv_heads or n_heads
    n_out = meta.shape_out_in[0]
    rows = torch.arange(n_out)
    if layout == "per_head":
        if n_kv_heads != n_heads or n_out % (3 * n_heads):
            raise ValueError(f"{meta.name}: {n_out} rows do not fit [head, (q,k,v), head_dim] "
                             f"with {n_heads} heads")
        head_dim = n_out // (3 * n_heads)
        return (rows % (3 * head_dim)) // head_dim
    head_dim, remainder = divmod(n_out, n_heads + 2 * n_kv_heads)
    if remainder:
        raise ValueError(f"{meta.name}: {n_out} rows do not fit [q; k; v] with {n_heads} query "
                         f"and {n_kv_heads} key/value heads")
    q_rows, kv_rows = n_heads * head_dim, n_kv_heads * head_dim
    return (rows >= q_rows).long() + (rows >= q_rows + kv_rows).long()
