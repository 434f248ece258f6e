"""The toy task's tokenizer: one token per character, plus `\\boxed{` as a single token.

Built locally with the `tokenizers` library (nothing is downloaded) and saved as an HF tokenizer so
that `AutoTokenizer.from_pretrained` and vLLM load it like any real model's. A regex pre-tokenizer
isolates `\\boxed{` and otherwise every single character; a word-level model maps each piece to its
id; a Fuse decoder joins tokens back with no inserted spaces, so decode(encode(text)) == text for
every prompt and response of the task. No BOS is added and there is no chat template: prompts are
raw text.

Ids: 0 pad, 1 end-of-sequence, 2 unknown (never produced by the task; it keeps an odd character from
crashing a caller), then the vocabulary below.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from megatron_speed.data.toy_task import BOX_CLOSE, BOX_OPEN

PAD, EOS, UNK = "<|pad|>", "<|endoftext|>", "<|unk|>"
SPECIAL_TOKENS = (PAD, EOS, UNK)
TEXT_TOKENS = (*"0123456789", "+", "=", " ", BOX_OPEN, BOX_CLOSE)


def toy_vocab() -> dict[str, int]:
    """Token -> id; specials first so pad (0) and eos (1) are fixed and distinct."""
    return {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *TEXT_TOKENS))}


def _build_backend() -> Tokenizer:
    """The `tokenizers` pipeline: split into `\\boxed{` or single characters, look up, fuse."""
    tok = Tokenizer(models.WordLevel(vocab=toy_vocab(), unk_token=UNK))
    pattern = Regex(r"\\boxed\{|.")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern, behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def build_toy_tokenizer(save_dir: Path) -> PreTrainedTokenizerFast:
    """Build the toy tokenizer, save it to `save_dir` (HF layout) and return the loaded wrapper."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_build_backend(),
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(save_dir))
    return tokenizer
