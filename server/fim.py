"""Fill-in-the-middle prompts: which FIM template a model uses, read from its tokenizer's vocabulary.

A template names the marker tokens a code model was trained with and where they go:

    qwen       Qwen2.5-Coder   <|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>   repo: <|repo_name|>, <|file_sep|>
    starcoder  StarCoder(2), SmolLM  <fim_prefix>P<fim_suffix>S<fim_middle>   repo: <repo_name>, <file_sep>
    deepseek   DeepSeek-Coder  <BOS><｜fim▁begin｜>P<｜fim▁hole｜>S<｜fim▁end｜>
    codellama  CodeLlama       <BOS>▁<PRE>P▁<SUF>S▁<MID>

``auto`` takes the first of these whose three FIM markers are tokens of the vocabulary (a model with
none has no FIM: the endpoints that need it answer 400). ``--fim-template NAME`` forces one; markers the
vocabulary lacks are then tokenized as plain text (for models fine-tuned on textual markers).

Repository-level FIM (``/infill``'s ``input_extra``): with repository and file-separator tokens the
files become file-separated context, as Qwen2.5-Coder and StarCoder2 were trained::

    qwen:      <|repo_name|>myproject\\n<|file_sep|>a.py\\n<text><|file_sep|>filename\\n<|fim_prefix|>P...
    starcoder: <repo_name>myproject<file_sep>a.py\\n<text><file_sep><fim_prefix>filename\\nP...

without them each file is plain text (``--- a.py ---`` and its text) before the FIM prefix marker. The
current file's name is not part of llama.cpp's request: it is ``filename``, and the repository
``myproject``, as llama.cpp's server writes them. Every text piece is tokenized on its own, so the
tokens of a repeated context are the same whatever follows (the prefix cache then serves them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

AUTO, NONE = "auto", "none"
REPO_NAME, FILENAME = "myproject", "filename"

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class FimTemplate:
    name: str
    prefix: tuple[str, ...]  # spellings of each marker token (the first is the text used when it is missing)
    suffix: tuple[str, ...]
    middle: tuple[str, ...]
    repo: tuple[str, ...] = ()  # repository-name marker (repo-level FIM)
    file_sep: tuple[str, ...] = ()  # file separator (repo-level FIM)
    ends: tuple[str, ...] = ()  # tokens that end an infill besides the model's EOS
    bos: bool = False  # the prompt starts with the tokenizer's BOS token
    newline_after_repo: bool = True  # '<repo>name\n' (Qwen) or '<repo>name' (StarCoder2)
    path_after_prefix: bool = False  # '<file_sep><fim_prefix>path\n' (StarCoder2) or '<file_sep>path\n<fim_prefix>'


TEMPLATES: dict[str, FimTemplate] = {t.name: t for t in (
    FimTemplate("qwen", ("<|fim_prefix|>",), ("<|fim_suffix|>",), ("<|fim_middle|>",), repo=("<|repo_name|>",),
                file_sep=("<|file_sep|>",), ends=("<|endoftext|>", "<|fim_pad|>")),
    FimTemplate("starcoder", ("<fim_prefix>",), ("<fim_suffix>",), ("<fim_middle>",),
                repo=("<repo_name>", "<reponame>"), file_sep=("<file_sep>",), ends=("<|endoftext|>", "<fim_pad>"),
                newline_after_repo=False, path_after_prefix=True),
    FimTemplate("deepseek", ("<｜fim▁begin｜>",), ("<｜fim▁hole｜>",), ("<｜fim▁end｜>",), ends=("<|EOT|>",),
                bos=True),
    FimTemplate("codellama", ("▁<PRE>", "<PRE>"), ("▁<SUF>", "<SUF>"), ("▁<MID>", "<MID>"),
                ends=("▁<EOT>", "<EOT>"), bos=True),
)}
CHOICES = (AUTO, NONE, *TEMPLATES)
MARKERS = ("prefix", "suffix", "middle", "repo", "file_sep")


def _find(vocab: dict[str, int], spellings: tuple[str, ...]) -> int | None:
    return next((vocab[s] for s in spellings if s in vocab), None)


@dataclass(frozen=True)
class FimFormat:
    """A template bound to one vocabulary: the marker ids (None: tokenized as text) and the stop tokens."""

    template: FimTemplate
    ids: dict[str, int | None]
    bos_id: int | None
    stop_token_ids: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.template.name

    @property
    def missing(self) -> list[str]:
        """Markers of the template that are not tokens of the vocabulary (tokenized as text)."""
        t = self.template
        return [getattr(t, m)[0] for m in MARKERS if getattr(t, m) and self.ids[m] is None]

    @property
    def repo_level(self) -> bool:
        return bool(self.template.repo and self.template.file_sep)

    def _marker(self, role: str, encode: Encode) -> list[int]:
        i = self.ids[role]
        return [i] if i is not None else encode(getattr(self.template, role)[0])

    def prompt(self, encode: Encode, prefix: str, suffix: str, middle: str = "",
               extra: Sequence[tuple[str, str]] = ()) -> list[int]:
        """The token ids of an infill prompt; ``extra``: (filename, text) of other files, oldest first."""
        t = self.template
        out: list[int] = [self.bos_id] if t.bos and self.bos_id is not None else []

        def text(s: str) -> None:
            if s:
                out.extend(encode(s))

        header = ""  # the current file's name, where the template puts it
        if extra and self.repo_level:
            out += self._marker("repo", encode)
            text(REPO_NAME + ("\n" if t.newline_after_repo else ""))
            for name, body in extra:
                out += self._marker("file_sep", encode)
                text(f"{name}\n")
                text(_ending_in_newline(body))
            out += self._marker("file_sep", encode)
            header = f"{FILENAME}\n"
        else:
            for name, body in extra:
                text(f"--- {name} ---\n")
                text(_ending_in_newline(body))
        if not t.path_after_prefix:
            text(header)
        out += self._marker("prefix", encode)
        if t.path_after_prefix:
            text(header)
        text(prefix)
        out += self._marker("suffix", encode)
        text(suffix)
        out += self._marker("middle", encode)
        text(middle)
        return out


def _ending_in_newline(text: str) -> str:
    return text if not text or text.endswith("\n") else text + "\n"


def bind(template: FimTemplate, vocab: dict[str, int], bos_id: int | None) -> FimFormat:
    ids = {m: _find(vocab, getattr(template, m)) for m in MARKERS}
    stops = [i for i in ids.values() if i is not None]
    stops += [vocab[s] for s in template.ends if s in vocab]
    return FimFormat(template, ids, bos_id, tuple(sorted(set(stops))))


def detect(vocab: dict[str, int]) -> FimTemplate | None:
    """The first template whose three FIM markers are all tokens of ``vocab``."""
    for t in TEMPLATES.values():
        if all(_find(vocab, getattr(t, m)) is not None for m in ("prefix", "suffix", "middle")):
            return t
    return None


def choose(vocab: dict[str, int], bos_id: int | None, choice: str = AUTO) -> FimFormat | None:
    """The FIM format for a vocabulary: ``auto`` (detected; None without FIM tokens), ``none``, or a name."""
    if choice == NONE:
        return None
    if choice == AUTO:
        t = detect(vocab)
        return None if t is None else bind(t, vocab, bos_id)
    if choice not in TEMPLATES:
        raise ValueError(f"unknown FIM template {choice!r}: choose one of {', '.join(CHOICES)}")
    return bind(TEMPLATES[choice], vocab, bos_id)
