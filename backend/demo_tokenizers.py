"""The demo models' tokenizers (backend/demo.py), written as small files in the published layouts: a
CLIP byte-level BPE (vocab.json + merges.txt, as the 2.x priors and 2.2's image-free encoders ship), and
SentencePiece-style Unigram tokenizer.json files for the XLM-R (2.1 decoder) and T5 (Kandinsky 3) ones.
They load through transformers' own tokenizer classes, like the real ones."""
from __future__ import annotations

import json
from pathlib import Path

from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2/CLIP's byte -> character table

# A few merges of common English letter pairs, so words are not all single characters.
DEMO_MERGES = ["t h", "th e</w>", "a n", "an d</w>", "i n", "in g</w>", "e r", "o n", "r e", "a t",
               "c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]


def write_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> int:
    """A small CLIP BPE tokenizer (all bytes, a few merges); returns the vocabulary size. The 2.1
    prior's tokenizer pads with "!" (id 0), 2.2's with the end-of-text token."""
    folder.mkdir(parents=True, exist_ok=True)
    characters = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in characters + [c + "</w>" for c in characters]:
        vocab.setdefault(token, len(vocab))
    merges = list(dict.fromkeys(DEMO_MERGES))
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
               "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=77, errors="replace")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return len(vocab)


# SentencePiece-style (Unigram) vocabulary for the XLM-R and T5 demo tokenizers: common words,
# then every printable ASCII character, so any prompt tokenizes (other characters become <unk>).
DEMO_WORDS = ["a", "the", "of", "and", "in", "on", "with", "red", "blue", "green", "cat", "dog", "fox",
              "house", "forest", "snowy", "painting", "oil", "photo", "portrait", "lighthouse", "sea",
              "sky", "city", "night", "light", "tree", "mountain", "river", "flower"]
# family -> (specials in id order, unk, the template around one sequence, tokenizer class, max length)
UNIGRAM_STYLES = {
    "xlm-roberta": (["<s>", "<pad>", "</s>", "<unk>"], "<unk>", (["<s>"], ["</s>"]), "XLMRobertaTokenizerFast", 512),
    "t5": (["<pad>", "</s>", "<unk>"], "<unk>", ([], ["</s>"]), "T5TokenizerFast", 128),
}


def write_unigram_tokenizer(folder: Path, style: str) -> int:
    """A small tokenizer.json in the layout of the published XLM-R (2.1 decoder) or T5 (Kandinsky 3)
    tokenizers; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    specials, unk, (before, after), class_name, max_length = UNIGRAM_STYLES[style]
    vocab = [(token, 0.0) for token in specials]
    vocab += [("\u2581" + word, -2.0 - i / 100) for i, word in enumerate(DEMO_WORDS)]
    vocab += [("\u2581", -4.0)] + [(chr(c), -5.0) for c in range(33, 127)]
    if style == "xlm-roberta":
        vocab.append(("<mask>", 0.0))
    ids = {token: i for i, (token, _) in enumerate(vocab)}
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=ids[unk], byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                       pre_tokenizers.Metaspace(prepend_scheme="always")])
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="always")
    single = " ".join([*before, "$A", *after])
    pair = " ".join([*before, "$A", *after, *after, "$B", *after]) if before else " ".join(["$A", *after, "$B", *after])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, ids[t]) for t in dict.fromkeys(before + after)])
    tokenizer.add_special_tokens([t for t, _ in vocab if t.startswith("<")])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    if style == "xlm-roberta":
        special.update(bos_token="<s>", cls_token="<s>", sep_token="</s>", mask_token="<mask>")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = dict(special, tokenizer_class=class_name, model_max_length=max_length, clean_up_tokenization_spaces=False)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return len(vocab)
