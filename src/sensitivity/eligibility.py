"""Which weights a run scores: layers, embeddings, tied weights and the target restriction.

Scored by default: every weight matrix (ndim >= 2) except the embeddings and the output head;
``include_embeddings`` adds them. Tied weights (GPT-2 ``wte`` = ``lm_head``) count once, under
their first name. ``layers`` (block indices) and ``target_layers`` intersect; ``components``
keeps only the named components (src/models/components.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from src.errors import UserError
from src.models.components import COMPONENTS, component_of, layer_index

EMBEDDING_COMPONENTS = ("embedding", "pos_embedding", "head")
NEVER_SCORED = {"norm": "norm weights are 1-D and never scored", "other": "'other' is not a target"}


@dataclass(frozen=True)
class Eligibility:
    """The restriction a run applies: None means no restriction on that axis."""
    layers: frozenset[int] | None = None
    components: frozenset[str] | None = None
    include_embeddings: bool = False


def parse_layers(spec: str | None) -> set[int] | None:
    """'0-3,10' -> {0, 1, 2, 3, 10}; None or '' -> None (every layer). ValueError when malformed."""
    if not spec:
        return None
    layers: set[int] = set()
    for part in spec.split(","):
        if "-" in part:
            low, high = (int(x) for x in part.split("-"))
            if high < low:
                raise ValueError(f"range {part} runs backwards")
            layers.update(range(low, high + 1))
        else:
            layers.add(int(part))
    return layers


def restriction(layers: set[int] | None, target_layers: set[int] | None,
                target_components, include_embeddings: bool) -> Eligibility:
    """Layers intersected with target layers, and the target components (None: all)."""
    chosen = layers if target_layers is None else \
        (target_layers if layers is None else layers & target_layers)
    return Eligibility(None if chosen is None else frozenset(chosen),
                       frozenset(target_components) if target_components else None,
                       include_embeddings)


def unscorable(component: str, include_embeddings: bool) -> str | None:
    """Why ``component`` cannot be a target of scoring, or None when it can."""
    if component not in COMPONENTS:
        scorable = ", ".join(c for c in COMPONENTS if c not in NEVER_SCORED)
        return f"'{component}' is not a component; choose from {scorable}"
    if component in NEVER_SCORED:
        return NEVER_SCORED[component]
    if component in EMBEDDING_COMPONENTS and not include_embeddings:
        return f"{component} is scored only when embeddings are included"
    return None


def eligible_parameters(model, eligibility: Eligibility = Eligibility()) \
        -> dict[str, torch.nn.Parameter]:
    """Scored weights in model order (tied weights once, under their first name)."""
    selected = {}
    for name, param in model.named_parameters():  # de-duplicates tied weights
        if param.ndim < 2:
            continue
        component = component_of(name)
        if component in EMBEDDING_COMPONENTS and not eligibility.include_embeddings:
            continue
        if eligibility.layers is not None and layer_index(name) not in eligibility.layers:
            continue
        if eligibility.components is not None and component not in eligibility.components:
            continue
        selected[name] = param
    if not selected:
        raise UserError("no weights are eligible for scoring with these layer, embedding and "
                        "target-component settings")
    return selected


def tied_parameter_names(model) -> dict[str, str]:
    """alias name -> kept name, for parameters shared between modules (e.g. lm_head = wte)."""
    kept_by_id, aliases = {}, {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in kept_by_id:
            aliases[name] = kept_by_id[id(param)]
        else:
            kept_by_id[id(param)] = name
    return aliases


def unscored_reason(name: str, param, first_name: str, scored: set[str]) -> str:
    """Why a parameter of the model is not among the scored weights."""
    if first_name != name:
        return f"tied to {first_name}" + (" (scored once there)" if first_name in scored else "")
    if param.ndim < 2:
        return "1-D (norm weight or bias): never scored"
    if component_of(name) in EMBEDDING_COMPONENTS:
        return "embedding/head: scored only with --include-embeddings"
    return "outside --layers / --target-layers / --target-components"
