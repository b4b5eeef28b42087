"""Texts -> disjoint calibration / evaluation token blocks.

Sources (first that applies): ``--data-file PATH``, ``--dataset NAME[:CONFIG[:SPLIT]]``, else the
bundled corpus (``src/data/corpus.txt``, original writing for this project).

Data-file format: UTF-8 text. If it contains blank lines, each blank-line-separated chunk is one
document; otherwise each non-empty line is one document.

The split is by document and deterministic: after dropping exact duplicates, documents at even
positions (0, 2, 4, ...) are evaluation text and documents at odd positions are calibration text,
so the two never share a document. A source with a single document is cut in two at the
whitespace nearest its middle (``DataSplit.halved``; the run warns, as it does when a side
gets fewer blocks than asked).

Packing: each side's documents are tokenized (no special tokens), joined with the EOS token, and
cut into blocks of exactly ``max_length`` tokens; the incomplete tail is dropped. ``max_blocks``
keeps the first N blocks of each side.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from src.errors import UserError
from src.utils import hub

CORPUS_PATH = Path(__file__).with_name("corpus.txt")


@dataclass
class TokenBlocks:
    """Token blocks [n_blocks, max_length]; attention_mask is 1 on real tokens, 0 on padding."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def subset(self, index) -> "TokenBlocks":
        index = torch.as_tensor(index, dtype=torch.long)
        return TokenBlocks(self.input_ids[index], self.attention_mask[index])

    def batches(self, batch_size: int, device=None):
        """Yield (input_ids, attention_mask) batches moved to ``device``."""
        for start in range(0, len(self), batch_size):
            ids = self.input_ids[start:start + batch_size]
            mask = self.attention_mask[start:start + batch_size]
            if device is not None:
                ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            yield ids, mask

    def batch(self, index: int, batch_size: int, device=None):
        """(input_ids, attention_mask) of batch ``index`` (blocks index·B .. index·B+B-1)."""
        rows = slice(index * batch_size, (index + 1) * batch_size)
        ids, mask = self.input_ids[rows], self.attention_mask[rows]
        if device is not None:
            ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        return ids, mask

    def n_predicted_tokens(self) -> int:
        """Positions with a valid (input, next-token) pair: what the mean NLL averages over."""
        mask = self.attention_mask
        return int((mask[:, 1:] * mask[:, :-1]).sum())

    def sha256(self) -> str:
        return hashlib.sha256(self.input_ids.cpu().numpy().tobytes()).hexdigest()


@dataclass
class DataSplit:
    calibration: TokenBlocks
    evaluation: TokenBlocks
    source: str
    n_documents: int
    calibration_documents: int
    evaluation_documents: int
    halved: bool = False  # the source was a single document, cut in two

    def sides(self) -> str:
        """'calibration: 1 document, 4 blocks; evaluation: 2 documents, 4 blocks'."""
        return "; ".join(f"{side}: {_count(documents, 'document')}, {_count(len(blocks), 'block')}"
                         for side, documents, blocks in (
                             ("calibration", self.calibration_documents, self.calibration),
                             ("evaluation", self.evaluation_documents, self.evaluation)))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# ----------------------------------------------------------------------------- texts

def bundled_documents() -> list[str]:
    return parse_documents(CORPUS_PATH.read_text(encoding="utf-8"))


def parse_documents(text: str) -> list[str]:
    """Blank-line-separated documents if there are blank lines, else one per line."""
    text = text.replace("\r\n", "\n")
    if "\n\n" in text.strip():
        chunks = text.split("\n\n")
    else:
        chunks = text.split("\n")
    return [" ".join(chunk.split()) for chunk in chunks if chunk.strip()]


def load_documents(data_file: str | None = None, dataset: str | None = None) -> tuple[list[str], str]:
    """(documents, source description)."""
    if data_file:
        return _documents_from_file(Path(data_file)), f"file:{data_file}"
    if dataset:
        return _documents_from_dataset(dataset), f"dataset:{dataset}"
    return bundled_documents(), "bundled:src/data/corpus.txt"


def _documents_from_file(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"data file '{path}' does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"data file '{path}' is not UTF-8 text") from None
    documents = parse_documents(text)
    if not documents:
        raise UserError(f"data file '{path}' is empty: it needs text (documents separated by "
                        f"blank lines, or one per line)")
    return documents


def _documents_from_dataset(dataset: str) -> list[str]:
    """``NAME[:CONFIG[:SPLIT]]`` through the datasets library; the 'text' column."""
    name, config, split = (dataset.split(":") + [None, None])[:3]
    table = hub.load_dataset(name, config or None, split or "train", f"dataset '{dataset}'",
                             "a local text file works offline (--data-file PATH), as does the "
                             "bundled corpus")
    if "text" not in table.column_names:
        raise UserError(f"dataset '{dataset}' has no 'text' column (columns: "
                        f"{table.column_names})")
    return [" ".join(t.split()) for t in table["text"] if t and t.strip()]


def split_documents(documents: list[str]) -> tuple[list[str], list[str]]:
    """(calibration, evaluation): odd / even positions after de-duplication (see module doc)."""
    unique = list(dict.fromkeys(documents))
    if single_document(documents):
        unique = _halve(unique[0])
    return unique[1::2], unique[0::2]


def single_document(documents: list[str]) -> bool:
    """Whether the source is one document (after de-duplication): the split cuts it in two."""
    return len(dict.fromkeys(documents)) == 1


def _halve(document: str) -> list[str]:
    middle = len(document) // 2
    cut = document.rfind(" ", 0, middle)
    cut = cut if cut > 0 else middle
    return [document[:cut].strip(), document[cut:].strip()]


# ----------------------------------------------------------------------------- tokens

def pack_blocks(tokenizer, documents: list[str], max_length: int, max_blocks: int | None) -> TokenBlocks:
    """Tokenize, join with EOS, cut into full blocks of ``max_length`` tokens."""
    eos = tokenizer.eos_token_id
    encoded = tokenizer(documents, add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
    n_blocks = len(stream) // max_length
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    ids = torch.tensor(stream[:n_blocks * max_length], dtype=torch.long).view(n_blocks, max_length)
    return TokenBlocks(ids, torch.ones_like(ids))


def prepare_data(tokenizer, *, data_file=None, dataset=None, max_length: int,
                 max_samples: int | None, documents: tuple[list[str], str] | None = None) \
        -> DataSplit:
    """Disjoint calibration / evaluation blocks of ``documents`` ((texts, source), as
    ``load_documents`` returns them; read here from ``data_file``/``dataset`` when None)."""
    documents, source = documents or load_documents(data_file, dataset)
    calibration_docs, evaluation_docs = split_documents(documents)
    calibration = pack_blocks(tokenizer, calibration_docs, max_length, max_samples)
    evaluation = pack_blocks(tokenizer, evaluation_docs, max_length, max_samples)
    for side, blocks, docs in (("calibration", calibration, calibration_docs),
                               ("evaluation", evaluation, evaluation_docs)):
        if len(blocks) == 0:
            n_tokens = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs)
            raise UserError(f"data too short: the {side} half of {source} has {n_tokens} tokens, "
                            f"fewer than one block of --max-length {max_length}; give more text "
                            f"or a smaller --max-length")
    return DataSplit(calibration, evaluation, source, len(documents),
                     len(calibration_docs), len(evaluation_docs), single_document(documents))
