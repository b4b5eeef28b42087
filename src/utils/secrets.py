"""No credential in any file the tool writes.

``redact(text)`` blanks what looks like a credential: access tokens by their well-known shapes
(Hugging Face ``hf_...``, OpenAI ``sk-...``, GitHub ``ghp_...``/``github_pat_...``, AWS ``AKIA...``,
Slack ``xox?-...``), the password of a URL with ``user:password@``, and the value after a
secret-looking flag or assignment (``--token X`` in a command line, ``--api-key=X``,
``PASSWORD=X``, ``token: X``). Every string
the writers in src/utils/io.py write goes through it, and so does every line the tool prints
while ``redacted_console()`` holds (the command-line entry points run inside it): a password in
``--model`` or ``--dataset`` is not echoed by an error message. ``reproducible_environment()``
keeps only the environment variables that matter for reproducing a run (an allowlist), their
values redacted the same way.
"""
from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager

REDACTED = "<redacted>"
SECRET_WORD = r"(?:token|key|secret|passw(?:or)?d|credential|auth)"
TOKEN_SHAPES = re.compile(
    r"(?<![A-Za-z0-9])(?:hf_[A-Za-z0-9]{20,}|sk-(?:proj-)?[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}"
    r"|github_pat_[A-Za-z0-9_]{20,}|(?:AKIA|ASIA)[0-9A-Z]{16}|xox[abprs]-[A-Za-z0-9-]{10,})")
URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+):[^@\s/]+@")
SECRET_ASSIGNMENT = re.compile(
    rf"(?P<name>[-\w]*{SECRET_WORD}[-\w]*)(?P<sep>\s*[=:]\s*)(?P<value>[^\s,;&\"']+)",
    re.IGNORECASE)
SECRET_FLAG = re.compile(rf"^--?[-\w]*{SECRET_WORD}[-\w]*$", re.IGNORECASE)

ENV_PREFIXES = ("CUDA_", "CUBLAS_", "CUDNN_", "NCCL_", "OMP_", "MKL_", "KMP_", "GOMP_",
                "OPENBLAS_", "PYTORCH_", "TORCH_", "TORCHINDUCTOR_", "TRANSFORMERS_", "HF_",
                "TOKENIZERS_", "ACCELERATE_", "CWA_")
ENV_NAMES = ("XDG_CACHE_HOME", "PYTHONHASHSEED", "PYTHONPATH", "WORLD_SIZE", "RANK",
             "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NUMEXPR_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS", "LD_LIBRARY_PATH")
SECRET_NAME = re.compile(SECRET_WORD, re.IGNORECASE)


def redact(text: str) -> str:
    text = TOKEN_SHAPES.sub(REDACTED, text)
    text = URL_PASSWORD.sub(lambda m: f"{m.group('head')}:{REDACTED}@", text)
    return SECRET_ASSIGNMENT.sub(
        lambda m: m.group(0) if m.group("value") == REDACTED else
        f"{m.group('name')}{m.group('sep')}{REDACTED}", text)


class _RedactingStream:
    """A text stream that passes on every string written to it redacted."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)

    def __getattr__(self, name):  # flush, isatty, fileno, encoding, ...
        return getattr(self._stream, name)


@contextmanager
def redacted_console():
    """sys.stdout and sys.stderr redacted for the duration."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _RedactingStream(sys.stdout), _RedactingStream(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def redact_argv(argv: list[str]) -> list[str]:
    """A command line with the value after any secret-looking flag blanked too."""
    out = []
    for i, arg in enumerate(argv):
        out.append(REDACTED if i and SECRET_FLAG.match(argv[i - 1]) else redact(arg))
    return out


def reproducible_environment(environ=None) -> dict[str, str]:
    """The allowlisted variables (sorted), secret-named ones blanked, values redacted."""
    environ = os.environ if environ is None else environ
    kept = {}
    for name in sorted(environ):
        if name in ENV_NAMES or name.startswith(ENV_PREFIXES):
            kept[name] = REDACTED if SECRET_NAME.search(name) else redact(environ[name])
    return kept
