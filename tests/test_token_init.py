"""`student.token_init=teacher`: the PCA reduction, the teacher's embedding matrix gathered on every rank, the student
built from the real SmolLM2 teacher, frozen embeddings through a real training run, and the config checks."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from multiproc import run_ranks
from test_teacher import TINY_LLAMA, real_teacher_path, tiny_folder  # noqa: F401 - tiny_folder is a fixture
from test_train import run_ok, shapes, train_cmd  # noqa: F401 - shapes is a fixture
from transformers import LlamaModel

from kclip.config import ConfigError, TeacherConfig, load_config
from kclip.validate import validate
from kclip.export.format import MODEL_STATES
from kclip.models.knowledge_clip import KnowledgeCLIP
from kclip.models.token_init import init_token_embeddings, pca_reduce
from kclip.teacher.load import build_teacher
from kclip.train import checkpoint
from kclip.train.engine import build_optimizer

TOKEN_EMBEDDING = "student.text.text_model.embeddings.token_embedding.weight"


def anisotropic(v=400, d=24, seed=0) -> torch.Tensor:
    """Rows with a common offset and a decaying spectrum, like a decoder's input embeddings."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v, d, generator=g) * torch.logspace(0, -1.5, d) + torch.randn(d, generator=g)


def explained(weight: torch.Tensor, reduced: torch.Tensor) -> float:
    """Share of the rows' variance that a linear map of `reduced` reproduces (indifferent to column scales)."""
    x = (weight - weight.mean(0)).double()
    fit = reduced.double() @ torch.linalg.lstsq(reduced.double(), x).solution
    return float(1 - (x - fit).pow(2).sum() / x.pow(2).sum())


def test_pca_reduce_is_deterministic_with_the_students_scale():
    w = anisotropic()
    out = pca_reduce(w, 8, std=0.02)
    assert out.shape == (400, 8) and out.dtype == torch.float32
    assert torch.equal(out, pca_reduce(w.clone(), 8, std=0.02))
    torch.testing.assert_close(out.mean(0), torch.zeros(8), atol=1e-7, rtol=0)
    torch.testing.assert_close(out.std(0, unbiased=False), torch.full((8,), 0.02))
    # Principal coordinates are uncorrelated, and the sign convention makes them independent of the input's row order.
    cov = out.double().T @ out.double() / 400
    torch.testing.assert_close(cov, torch.diag(cov.diag()), atol=1e-9, rtol=0)
    perm = torch.randperm(400, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(pca_reduce(w[perm], 8, std=0.02), out[perm], atol=1e-6, rtol=0)


def test_pca_keeps_more_variance_than_random_projections():
    w = anisotropic()
    x = (w - w.mean(0)).double()
    top = torch.linalg.eigvalsh(x.T @ x).flip(0)
    pca = explained(w, pca_reduce(w, 6, std=0.02))
    assert pca == pytest.approx(float(top[:6].sum() / top.sum()), abs=1e-6)
    g = torch.Generator().manual_seed(0)
    randoms = [explained(w, w @ torch.linalg.qr(torch.randn(24, 6, generator=g))[0]) for _ in range(20)]
    assert pca > max(randoms)


def test_pca_reduce_wider_than_the_rows_pads_zero_columns():
    w = anisotropic(d=10)
    out = pca_reduce(w, 16, std=0.05)
    assert out.shape == (400, 16) and torch.equal(out[:, 10:], torch.zeros(400, 6))
    torch.testing.assert_close(out[:, :10].std(0, unbiased=False), torch.full((10,), 0.05))
    assert explained(w, out[:, :10]) == pytest.approx(1.0, abs=1e-6)


def test_pca_reduce_errors():
    with pytest.raises(ValueError, match="weight must be"):
        pca_reduce(torch.ones(5), 2, std=0.02)
    with pytest.raises(ValueError, match="width must be"):
        pca_reduce(anisotropic(), 0, std=0.02)
    with pytest.raises(ValueError, match="all rows are equal"):
        pca_reduce(torch.ones(10, 4), 2, std=0.02)


@pytest.mark.parametrize("overrides, key", [
    (["student.token_init=pca"], "student.token_init"),
    (["teacher.random_config=null", "teacher.path=TEACHER_MISSING", "student.tokenizer=teacher",
      "student.token_init=teacher", "loss.distill_weight=0", "loss.concept_weight=0"], "teacher.path"),
    (["teacher.random_config=null", "teacher.path=TEACHER", "student.tokenizer=teacher", "student.token_init=teacher",
      "student.hf_clip=/some/clip"], "student.token_init"),
    (["student.token_init=teacher"], "student.token_init"),  # the byte tokenizer
    (["student.freeze_token_embeddings=true"], "student.freeze_token_embeddings"),
])
def test_invalid_token_init_configs(overrides, key, tmp_path):
    gguf = tmp_path / "t.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))  # validation reads only the magic
    cfg = load_config("smoke", [o.replace("TEACHER_MISSING", str(tmp_path / "none.gguf")).replace("TEACHER", str(gguf))
                                for o in overrides])
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=1, cuda=False)
    assert str(e.value).startswith(key + ":") and "\n" not in str(e.value)


def test_valid_token_init_config(shapes, tmp_path):  # noqa: F811 - shapes is the imported fixture
    gguf = tmp_path / "t.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    validate(load_config("smoke", [f"data.train={shapes}", "teacher.random_config=null", f"teacher.path={gguf}",
                                   "student.tokenizer=teacher", "student.token_init=teacher",
                                   "student.freeze_token_embeddings=true"]), world_size=1, cuda=False)


def test_unsharded_teacher_input_embeddings_are_a_float32_copy():
    teacher = build_teacher(TeacherConfig(random_config=TINY_LLAMA), shard=False)
    weight = teacher.module.embed_tokens.weight
    got = teacher.input_embeddings()
    assert got.dtype == torch.float32 and got.device.type == "cpu" and torch.equal(got, weight)
    got.zero_()
    assert weight.abs().sum() > 0


def test_rows_past_the_tokenizer_are_left_out():
    # The random teacher's byte tokenizer has 259 ids; its matrix has 384 rows, like a checkpoint padded past its
    # tokenizer. The extra rows must not enter the PCA.
    teacher = build_teacher(TeacherConfig(random_config=TINY_LLAMA), shard=False)
    cfg = load_config("smoke", ["student.token_init=teacher"])
    model = KnowledgeCLIP(cfg, teacher.tokenizer, teacher.hidden_size)
    init_token_embeddings(model.student, cfg.student, teacher)
    weight = teacher.input_embeddings()
    assert len(teacher.tokenizer) == 259 < weight.shape[0]
    emb = model.student.text.text_model.embeddings.token_embedding.weight
    assert torch.equal(emb, pca_reduce(weight[:259], 32, std=0.02))
    with pytest.raises(ValueError, match="student has 259 tokens but the teacher's embedding matrix only 100 rows"):
        init_token_embeddings(model.student, cfg.student, SimpleNamespace(input_embeddings=lambda: weight[:100]))


def _gathered_on_each_rank(folder):
    """The embedding matrix of a ZeRO-3 teacher loaded partitioned from a checkpoint, with and without CPU offload,
    and of a random one partitioned by deepspeed.initialize; plus each rank's share of the first."""
    loaded = build_teacher(TeacherConfig(path=folder, chunk_size=2))
    weight = loaded.module.module.embed_tokens.weight
    offloaded = build_teacher(TeacherConfig(path=folder, chunk_size=2, offload="cpu"))
    random = build_teacher(TeacherConfig(random_config=TINY_LLAMA, seed=3))
    return {"sharded": loaded.sharded, "share": weight.ds_tensor.numel() / weight.ds_numel,
            "loaded": loaded.input_embeddings().numpy(), "offload_cpu": offloaded.input_embeddings().numpy(),
            "random": random.input_embeddings().numpy()}


def test_zero3_teacher_gathers_the_whole_embedding_on_every_rank(tiny_folder):  # noqa: F811 - the imported fixture
    expected = LlamaModel.from_pretrained(tiny_folder).embed_tokens.weight.detach()
    random = build_teacher(TeacherConfig(random_config=TINY_LLAMA, seed=3), shard=False).input_embeddings()
    for res in run_ranks(_gathered_on_each_rank, tiny_folder, world_size=2):
        assert res["sharded"] and res["share"] == 0.5  # really partitioned: the gather is not a no-op
        for name in ("loaded", "offload_cpu"):
            assert torch.equal(torch.as_tensor(res[name]), expected), name
        assert torch.equal(torch.as_tensor(res["random"]), random)


@pytest.fixture(scope="module")
def real_teacher():
    # Layer 1: the token embeddings do not depend on the pooled layer, and fewer layers load and probe faster.
    return build_teacher(TeacherConfig(path=real_teacher_path(), layer=1))


def student_cfg(*overrides: str):
    return load_config("demo", ["student.tokenizer=teacher", "student.token_init=teacher", *overrides])


@pytest.mark.slow
@pytest.mark.teacher_file
def test_student_starts_from_the_real_teachers_embeddings(real_teacher):
    cfg = student_cfg()
    tok = real_teacher.tokenizer
    model = KnowledgeCLIP(cfg, tok, real_teacher.hidden_size)
    init_token_embeddings(model.student, cfg.student, real_teacher)
    emb = model.student.text.text_model.embeddings.token_embedding.weight
    teacher_weight = real_teacher.module.embed_tokens.weight
    assert emb.shape == (len(tok), cfg.student.text_width) == (teacher_weight.shape[0], 128)
    assert torch.equal(emb, pca_reduce(teacher_weight, 128, std=0.02)) and emb.requires_grad
    # Neighbours are the teacher's: each word is nearer its relative than an unrelated word (all single tokens).
    ids = {}
    for w in (" dog", " puppy", " cat", " kitten", " car", " truck", " banana", " apple", " guitar", " piano"):
        (ids[w],) = tok.encode(w, add_special_tokens=False)
    e = F.normalize(emb.detach(), dim=1)

    def cos(a, b):
        return float(e[ids[a]] @ e[ids[b]])

    for word, near, far in [(" dog", " puppy", " car"), (" cat", " kitten", " car"), (" car", " truck", " puppy"),
                            (" banana", " apple", " car"), (" guitar", " piano", " dog")]:
        assert cos(word, near) > cos(word, far), (word, near, far)
    nearest = [tok.decode([i]) for i in (e @ e[ids[" dog"]]).topk(6).indices.tolist()]
    assert {" dog", " dogs", " Dog"} <= set(nearest), nearest


@pytest.mark.slow
@pytest.mark.teacher_file
def test_frozen_token_embeddings_get_no_optimizer_state(real_teacher):
    cfg = student_cfg("student.freeze_token_embeddings=true")
    model = KnowledgeCLIP(cfg, real_teacher.tokenizer, real_teacher.hidden_size)
    init_token_embeddings(model.student, cfg.student, real_teacher)
    emb = model.student.text.text_model.embeddings.token_embedding.weight
    optimised = {id(p) for group in build_optimizer(model, cfg).param_groups for p in group["params"]}
    assert not emb.requires_grad and id(emb) not in optimised
    assert id(model.student.text.text_model.embeddings.position_embedding.weight) in optimised


@pytest.mark.slow
@pytest.mark.teacher_file
@pytest.mark.parametrize("losses", [[], ["loss.distill_weight=0", "loss.concept_weight=0"]],
                         ids=["with_teacher_losses", "token_init_alone"])
def test_training_keeps_frozen_teacher_embeddings(real_teacher, shapes, tmp_path, losses):  # noqa: F811 - fixture
    """Also for the ablation without a teacher loss, which reads the teacher for its embeddings alone."""
    run = tmp_path / "run"
    run_ok(train_cmd(run, shapes, "train.steps=2", "checkpoint.every=1", "teacher.random_config=null",
                     f"teacher.path={real_teacher_path()}", "teacher.layer=1", "student.tokenizer=teacher",
                     "student.token_init=teacher", "student.freeze_token_embeddings=true", *losses))
    first, second = (torch.load(tag / MODEL_STATES, map_location="cpu", weights_only=False)["module"]
                     for tag in checkpoint.complete_checkpoints(run / "checkpoints"))
    # smoke: text_width 32. Not bitwise: the run's single BLAS thread sums in another order than this process.
    expected = pca_reduce(real_teacher.module.embed_tokens.weight, 32, std=0.02)
    torch.testing.assert_close(first[TOKEN_EMBEDDING], expected, atol=1e-7, rtol=0)
    assert torch.equal(second[TOKEN_EMBEDDING], first[TOKEN_EMBEDDING])
    text = [k for k in first if k.startswith("student.text.") and k != TOKEN_EMBEDDING]
    changed = [k for k in text if not torch.equal(first[k], second[k])]
    assert "student.text.text_model.embeddings.position_embedding.weight" in changed and len(changed) > len(text) / 2

