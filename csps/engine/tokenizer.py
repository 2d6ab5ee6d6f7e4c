"""Tokenizers and chat templates via ``transformers``, plus incremental detokenization.

Converting the GGUF tokenizer takes ~17 s, so the converted tokenizer is saved once under
``$CSPS_CACHE_DIR`` (default ``~/.cache/csps``) and reloaded in ~0.4 s afterwards.
"""

from __future__ import annotations

import hashlib
import logging
import os

from csps.engine.weights import default_model_path, resolve_model
from csps.errors import ModelLoadError

log = logging.getLogger("csps.tokenizer")


def cache_dir() -> str:
    return os.environ.get("CSPS_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "csps"))


def _load_gguf_tokenizer(path: str):
    from transformers import AutoTokenizer

    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    cached = os.path.join(cache_dir(), "tokenizers", key)
    if os.path.exists(os.path.join(cached, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(cached)
    log.info("converting the tokenizer of %s (once; cached in %s)", os.path.basename(path), cached)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    tmp = f"{cached}.tmp{os.getpid()}"
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, cached)
    except OSError:  # another process won the race
        pass
    return tok


def load_tokenizer(model: str):
    """The Hugging Face tokenizer for a model spec (dummy models share SmolLM2's); None for a model
    directory that ships no tokenizer (the engine then takes token ids only)."""
    from transformers import AutoTokenizer

    if model.startswith("dummy:"):
        return _load_gguf_tokenizer(default_model_path())
    path = resolve_model(model)
    try:
        if os.path.isdir(path):
            if not any(os.path.exists(os.path.join(path, f)) for f in
                       ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
                log.warning("%s has no tokenizer files: prompts must be token ids", path)
                return None
            return AutoTokenizer.from_pretrained(path)
        return _load_gguf_tokenizer(path)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot load a tokenizer for {model}: {e}") from None


class Tokenizer:
    """The few operations the engine and server need, over a Hugging Face tokenizer."""

    def __init__(self, hf_tokenizer) -> None:
        self.hf = hf_tokenizer
        self.vocab_size = len(hf_tokenizer)
        self.eos_token_id = hf_tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode([i for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=True)

    def token_str(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            return ""
        return self.hf.decode([token_id])

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if not getattr(self.hf, "chat_template", None):
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            return self.encode(text)
        out = self.hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)


class IncrementalDetokenizer:
    """Text of the generated tokens, grown token by token without breaking multi-byte characters.

    Each token decodes only a short window (vLLM's prefix/read offsets): the text of the tokens since
    the last emitted boundary, with and without the new token. Both decodes start at the same token,
    so tokenizers that treat a leading space specially agree with themselves, and the work per token
    stays constant however long the output grows.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # the window's first token
        self.read_offset = 0  # tokens before this one are already in ``text``
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append a token; return the newly completed text (may be empty)."""
        self.ids.append(token_id)
        prefix_text = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self.tok.decode(self.ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # nothing printable yet (an incomplete UTF-8 sequence, a skipped special token)
        delta = new_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta
