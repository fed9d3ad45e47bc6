"""Converted copies of GGUF teachers (kclip.gguf_files): the same embeddings and fingerprint as the GGUF, bit
for bit; later loads never read the GGUF; an unwritable cache, a damaged copy, a failed converter and two ranks
converting at once all end with a working teacher."""
import fcntl
import logging
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from multiproc import run_ranks
from test_teacher import CAPTIONS, real_teacher_path

from kclip import gguf_files
from kclip.config import ConfigError, TeacherConfig
from kclip.gguf_files import gguf_config
from kclip.teacher.load import build_teacher
from kclip.tokenizers import load_tokenizer

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS, VOCAB = 64, 128, 4, 2, 2, 320


def write_tiny_gguf(path: Path) -> str:
    """A 2-layer Llama GGUF like the demo's: Q8_0 token embeddings, Q4_1 matrices, float32 norms, and a byte-level
    BPE (GPT-2) vocabulary."""
    rng = np.random.default_rng(0)
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_chars = [chr(c) for c in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *byte_chars, "Ġa", "Ġd"]
    tokens += [f"<extra_{i}>" for i in range(VOCAB - len(tokens))]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(["Ġ a", "Ġ d"])
    w.add_token_types([3, 3, 3] + [1] * (VOCAB - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def tensor(name, shape, kind=gguf.GGMLQuantizationType.Q4_1):
        values = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, values)
        else:
            w.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)

    tensor("token_embd.weight", (VOCAB, HIDDEN), gguf.GGMLQuantizationType.Q8_0)
    kv = HIDDEN // HEADS * KV_HEADS
    for i in range(LAYERS):
        for norm in ("attn_norm", "ffn_norm"):
            tensor(f"blk.{i}.{norm}.weight", (HIDDEN,), gguf.GGMLQuantizationType.F32)
        for name, shape in (("attn_q", (HIDDEN, HIDDEN)), ("attn_k", (kv, HIDDEN)), ("attn_v", (kv, HIDDEN)),
                            ("attn_output", (HIDDEN, HIDDEN)), ("ffn_gate", (FFN, HIDDEN)), ("ffn_up", (FFN, HIDDEN)),
                            ("ffn_down", (HIDDEN, FFN))):
            tensor(f"blk.{i}.{name}.weight", shape)
    tensor("output_norm.weight", (HIDDEN,), gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("KCLIP_CACHE", str(tmp_path / "cache"))
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def embed(path, **kw):
    """(embeddings, fingerprint) of a fresh teacher: the config and tokenizer read again, not from this process's
    lru caches."""
    gguf_config.cache_clear()
    load_tokenizer.cache_clear()
    t = build_teacher(TeacherConfig(path=path, chunk_size=2, **kw), shard=False)
    return t.embed(*t.tokenize(CAPTIONS)), t.fingerprint


def converted_folders(path) -> list[Path]:
    return [p for p in (gguf_files.cache_root() / "gguf").glob(f"{Path(path).stem}-*") if p.is_dir()]


def no_gguf_reads(monkeypatch):
    """Every GGUF read in transformers (config, tokenizer, weights) goes through gguf.GGUFReader."""
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: pytest.fail("the GGUF file was read"))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_converted_copy_embeds_bit_for_bit_like_the_gguf_and_later_loads_never_read_it(tiny_gguf, monkeypatch,
                                                                                             dtype):
    direct, direct_fp = embed(tiny_gguf, dtype=dtype, convert_gguf=False)
    assert not converted_folders(tiny_gguf)  # convert_gguf=false writes nothing
    cold, cold_fp = embed(tiny_gguf, dtype=dtype)
    [folder] = converted_folders(tiny_gguf)
    assert {"config.json", "model.safetensors", "tokenizer.json", "meta.json"} <= {p.name for p in folder.iterdir()}
    no_gguf_reads(monkeypatch)
    warm, warm_fp = embed(tiny_gguf, dtype=dtype)
    assert torch.equal(cold, direct) and torch.equal(warm, direct)
    # The embedding cache's key: it hashes the GGUF file, whichever copy the weights came from.
    assert direct_fp == cold_fp == warm_fp


def test_an_unwritable_cache_loads_the_gguf_after_one_warning(tmp_path, monkeypatch, caplog):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("KCLIP_CACHE", str(tmp_path / "file" / "cache"))  # not a folder: unwritable, even for root
    with caplog.at_level(logging.WARNING):
        emb, _ = embed(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "convert" in r.getMessage()]
    assert len(warnings) == 1 and "loading the GGUF directly" in warnings[0] and "KCLIP_CACHE" in warnings[0]
    monkeypatch.setenv("KCLIP_CACHE", str(tmp_path / "empty"))
    assert torch.equal(emb, embed(path, convert_gguf=False)[0])


def test_a_damaged_copy_is_not_read_but_rebuilt(tiny_gguf):
    expected, _ = embed(tiny_gguf)
    [folder] = converted_folders(tiny_gguf)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)  # a disk fault after the copy was complete
    assert gguf_files.resolve(tiny_gguf) == tiny_gguf
    assert torch.equal(embed(tiny_gguf)[0], expected)
    assert converted_folders(tiny_gguf) == [folder] and weights.stat().st_size == size


def test_a_process_waiting_for_a_converter_reads_its_copy_or_the_gguf_but_never_converts_again(tiny_gguf,
                                                                                                monkeypatch, caplog):
    """Another process holds the lock: this one waits, then reads the folder the holder wrote or, when it wrote none
    (its conversion failed), loads the GGUF instead of trying again."""
    folder, identity = gguf_files._place(tiny_gguf)
    folder.parent.mkdir(parents=True)
    holder_convert = gguf_files._convert
    monkeypatch.setattr(gguf_files, "_convert", lambda *a: pytest.fail("converted by a waiting process"))
    caplog.set_level(logging.INFO)
    for holder_succeeds in (False, True):
        caplog.clear()
        result: list[str] = []
        waiter = threading.Thread(target=lambda out=result: out.append(gguf_files.resolve(tiny_gguf, convert=True)))
        with open(folder.with_name(folder.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            waiter.start()
            deadline = time.monotonic() + 60
            while "waiting for another process" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
            if holder_succeeds:
                holder_convert(tiny_gguf, folder, identity)
        waiter.join(60)
        assert result == [str(folder) if holder_succeeds else tiny_gguf]
        assert ("did not finish" in caplog.text) != holder_succeeds


# A converter that never finishes: kclip's own locking, with the conversion replaced by a long sleep.
STUCK_CONVERTER = """
import sys, time
from kclip import gguf_files
gguf_files._convert = lambda *a: (print("converting", flush=True), time.sleep(120))
gguf_files.resolve(sys.argv[1], convert=True)
"""


def test_waiting_for_a_stuck_converter_ends_at_its_own_bound_with_one_line_naming_it(tiny_gguf, caplog):
    folder, _ = gguf_files._place(tiny_gguf)
    with subprocess.Popen([sys.executable, "-c", STUCK_CONVERTER, tiny_gguf], stdout=subprocess.PIPE,
                          text=True) as holder:
        try:
            assert holder.stdout.readline() == "converting\n"
            caplog.set_level(logging.INFO, logger=gguf_files.__name__)
            began = time.monotonic()
            with pytest.raises(ConfigError) as e:
                build_teacher(TeacherConfig(path=tiny_gguf, convert_timeout_s=1.0), shard=False)
            took = time.monotonic() - began
        finally:
            holder.kill()
    who = f"{socket.gethostname()}:{holder.pid}"
    assert 1.0 <= took < 5.0, took  # the bound, and reading the tiny GGUF's config before it
    message = str(e.value)
    assert "\n" not in message and re.match(re.escape("teacher.convert_timeout_s: waited ") + r"1\.\d s " + re.escape(
        f"for {who} converting {tiny_gguf} into {folder} (lock {folder}.lock)"), message), message
    assert "teacher.convert_gguf=false" in message
    [waiting] = [r.getMessage() for r in caplog.records if r.name == gguf_files.__name__]
    assert waiting.startswith(f"teacher: waiting for {who} converting {tiny_gguf} into {folder}: 0 s of at most 1 s")


def _sharded_teacher_on_an_empty_cache(path):
    conversions = []
    convert = gguf_files._convert
    gguf_files._convert = lambda *args: conversions.append(convert(*args))
    t = build_teacher(TeacherConfig(path=path, chunk_size=2))  # two ranks: ZeRO-3, weights loaded partitioned
    return t.embed(*t.tokenize(CAPTIONS)).numpy(), t.fingerprint, len(conversions)


def test_two_ranks_starting_together_convert_once_and_load_the_copy_sharded(tiny_gguf):
    expected, fingerprint = embed(tiny_gguf, convert_gguf=False)
    results = run_ranks(_sharded_teacher_on_an_empty_cache, tiny_gguf, world_size=2)
    assert sum(n for *_, n in results) == 1
    for emb, fp, _ in results:
        torch.testing.assert_close(torch.as_tensor(emb), expected, atol=1e-5, rtol=0)
        assert fp == fingerprint
    assert len(converted_folders(tiny_gguf)) == 1


@pytest.mark.slow
@pytest.mark.teacher_file
def test_the_demo_teachers_converted_copy_embeds_bit_for_bit_like_the_gguf(tmp_path, monkeypatch):
    path = real_teacher_path()
    monkeypatch.setenv("KCLIP_CACHE", str(tmp_path))
    direct = embed(path, convert_gguf=False)
    cold = embed(path)
    no_gguf_reads(monkeypatch)
    warm = embed(path)
    assert torch.equal(cold[0], direct[0]) and torch.equal(warm[0], direct[0])
    assert direct[1] == cold[1] == warm[1]
