"""Tokenizer loading shared by the data pipeline, the student and the teacher."""
from __future__ import annotations

import copy
import os
from functools import lru_cache

from kclip.gguf_files import gguf_config, resolve, split_gguf

# A random in-memory teacher (teacher.random_config) has no tokenizer files of its own: it reads byte ids.
RANDOM_TEACHER_TOKENIZER = "byte"


@lru_cache(maxsize=8)
def load_tokenizer(spec: str):
    """`byte`: a file-free byte-level tokenizer (ByT5's: 256 bytes + specials), usable where no vocab can be fetched.
    Otherwise an HF tokenizer folder or a `.gguf` file (read from its converted copy when there is one, 10x faster).
    Decoder LMs often lack a pad token: EOS stands in."""
    from transformers import AutoTokenizer, ByT5Tokenizer

    if spec == "byte":
        return ByT5Tokenizer(extra_ids=0)
    if not os.path.exists(spec):
        raise FileNotFoundError(f"tokenizer path does not exist: {spec}")
    folder, gguf_file = split_gguf(resolve(spec))
    if gguf_file:  # with the config, AutoTokenizer does not read the file's metadata once more to pick the class
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, config=gguf_config(spec))
    else:
        tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def student_tokenizer_spec(cfg) -> str:
    """The `load_tokenizer` spec of a run's student tokenizer. `auto`: a Hugging Face CLIP student's own tokenizer
    (its text tower pools each caption at its own end-of-text id, which only that tokenizer is sure to put there), else
    `byte`. `teacher`: the teacher's own, loaded from its files, so it is available whether or not the run loads the
    teacher model."""
    st = cfg.student
    if st.tokenizer == "auto":
        return st.hf_clip or "byte"
    if st.tokenizer == "teacher":
        return cfg.teacher.path or RANDOM_TEACHER_TOKENIZER
    return st.tokenizer


def student_tokenizer(cfg):
    """The tokenizer a run's student reads (see student_tokenizer_spec), ending every caption with an end-of-text
    token (`ending_with_eos`)."""
    return ending_with_eos(student_tokenizer_spec(cfg))


@lru_cache(maxsize=8)
def ending_with_eos(spec: str):
    """`load_tokenizer(spec)`, changed where needed so that every caption ends with its end-of-text token: the student
    pools a caption's last token, and CLIP's convention (which open_clip's `eos` pooling follows, so the student
    exports to open_clip) is that this is the end-of-text token, whose hidden state has seen the whole caption and
    marks where it stops. Byte and CLIP tokenizers append it already; Llama-family ones (SmolLM2's) do not, so a copy
    appends it, and drops the leading BOS when that is the same token (SmolLM2's is), since open_clip pools at the
    first end-of-text token. A copy: the teacher keeps its own tokenizer's behaviour."""
    tokenizer = load_tokenizer(spec)
    eos = tokenizer.eos_token_id
    if eos is None or tokenizer("a")["input_ids"][-1] == eos or not hasattr(tokenizer, "add_eos_token"):
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_eos_token = True
    if tokenizer.bos_token_id == eos:
        tokenizer.add_bos_token = False
    return tokenizer
