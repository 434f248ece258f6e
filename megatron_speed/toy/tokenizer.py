"""The toy task's tokenizer: one token per character, plus `\\boxed{` as a single token.

Built locally with the `tokenizers` library (nothing is downloaded) and saved as an HF tokenizer so
that `AutoTokenizer.from_pretrained` and vLLM load it like any real model's.

Why it is shaped like Qwen2's: transformers 5 loads the tokenizer of a folder whose config says
`model_type: qwen2` with `Qwen2Tokenizer`, which keeps only the vocabulary, merges and added tokens
of `tokenizer.json` and rebuilds the rest of the pipeline itself (NFC, Qwen2's split regex,
byte-level). A plain character-level pipeline therefore came back changed (spaces dropped,
`\\boxed{` split). So the toy tokenizer *is* that pipeline with a byte-level vocabulary and no
merges: every pre-token is split into single characters (space is `Ġ`, as byte-level spells it),
and `\\boxed{` is an added (non-special) token, which both pipelines match before pre-tokenizing.
The byte-level decoder restores the text exactly, with no inserted spaces. No BOS is added and
there is no chat template: prompts are raw text.

Ids: 0 pad, 1 end-of-sequence, then the characters, then `\\boxed{`. A character outside the
vocabulary is dropped by the encoder (BPE without an unknown token); the task never produces one.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from megatron_speed.data.toy_task import BOX_CLOSE, BOX_OPEN

PAD, EOS = "<|pad|>", "<|endoftext|>"
CHARACTERS = (*"0123456789", "+", "=", " ", BOX_CLOSE)
_BYTE_LEVEL_SPACE = "Ġ"  # how the byte-level alphabet spells " " (other ASCII here maps to itself)


def toy_vocab() -> dict[str, int]:
    """Token -> id of the base vocabulary (specials first so pad=0 and eos=1 are fixed, distinct)."""
    chars = [_BYTE_LEVEL_SPACE if c == " " else c for c in CHARACTERS]
    return {tok: i for i, tok in enumerate((PAD, EOS, *chars))}


def _build_backend() -> Tokenizer:
    """Qwen2's pipeline (NFC, split regex, byte-level) over a merge-free character vocabulary."""
    tok = Tokenizer(models.BPE(vocab=toy_vocab(), merges=[], unk_token=None, fuse_unk=False,
                               byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD, EOS)])
    tok.add_tokens([AddedToken(BOX_OPEN, special=False, normalized=False)])
    return tok


def build_toy_tokenizer(save_dir: Path) -> PreTrainedTokenizerFast:
    """Build the toy tokenizer, save it to `save_dir` (HF layout) and return the wrapper."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_build_backend(),
        pad_token=PAD,
        eos_token=EOS,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(save_dir))
    return tokenizer
