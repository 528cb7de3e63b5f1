"""Build `data/tokenizer/` (the dev stack's tokenizer) from GPT-2's byte-level BPE ranks.

Input: `gpt2.tiktoken` as shipped in the `openai-whisper` sdist on PyPI (`whisper/assets/`, MIT
licence, © OpenAI): one `base64(token bytes) rank` per line, the 50,256 byte-level BPE tokens of GPT-2.
Output: a Hugging Face `tokenizers` tokenizer.json (gzipped) with the merges recovered from the ranks,
GPT-2's pre-tokenizer regex, `<|endoftext|>` and two ChatML markers as added special tokens, plus a
tokenizer_config.json carrying kvr's own ChatML-style chat template (GPT-2 has none).

    pip download --no-deps --no-binary :all: openai-whisper==20250625 -d build/whisper
    tar xzf build/whisper/openai_whisper-20250625.tar.gz -C build/whisper
    .venv/bin/python tools/build_dev_tokenizer.py build/whisper/openai_whisper-20250625/whisper/assets/gpt2.tiktoken

Merges from ranks (the usual tiktoken → BPE conversion): a token of rank r is produced by the merge
that byte-pair encoding with only the ranks below r leaves as the last two parts of its bytes.
The script checks the result against a plain rank-based BPE on sample texts before writing.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

OUT = Path(__file__).resolve().parent.parent / "data" / "tokenizer"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GPT2_SPLIT = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+""")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character map (the vocabulary's spelling of raw bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def bpe(ranks: dict[bytes, int], token: bytes, max_rank: int | None = None) -> list[bytes]:
    parts = [bytes([b]) for b in token]
    while True:
        best: tuple[int, int] | None = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (max_rank is None or r < max_rank) and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            return parts
        i = best[1]
        parts = [*parts[:i], parts[i] + parts[i + 1], *parts[i + 2 :]]


def main(argv: list[str]) -> int:
    src = Path(argv[0])
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in src.read_text().splitlines() if line)}
    b2u = bytes_to_unicode()
    spell = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {spell(tok): rank for tok, rank in ranks.items()}
    merges: list[tuple[str, str]] = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) == 1:
            continue
        parts = bpe(ranks, tok, max_rank=rank)
        assert len(parts) == 2, (tok, parts)
        merges.append((spell(parts[0]), spell(parts[1])))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    for text in ("Hello, world! It's 2024 and   spaces  matter.\n", "naïve café — ünïcödé 東京", "x = f(y) + 3.14159 # ok"):
        want = [ranks[p] for chunk in GPT2_SPLIT.findall(text) for p in bpe(ranks, chunk.encode())]
        got = tok.encode(text, add_special_tokens=False).ids
        assert got == want, (text, got, want)
    assert [tok.token_to_id(s) for s in SPECIALS] == [50256, 50257, 50258]
    OUT.mkdir(parents=True, exist_ok=True)
    data = tok.to_str().encode()
    (OUT / "tokenizer.json.gz").write_bytes(gzip.compress(data, 9, mtime=0))
    config = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE}
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    print(f"wrote {OUT}: vocab {tok.get_vocab_size()}, {len(merges)} merges, tokenizer.json {len(data)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
