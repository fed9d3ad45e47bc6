"""`kclip eval`: every evaluation of one student, written to one flat metrics.json.

Keys (all floats unless noted; absent when the evaluation was skipped or not applicable):
  num_samples                                   distinct (image, caption) pairs in --data (int)
  num_images                                    distinct images in --data (int)
  retrieval/{i2t,t2i}_R@{1,5,10}                positives: same image id OR same raw caption (kclip.retrieval.metrics)
  retrieval/{i2t,t2i}_median_rank               1-based
  zeroshot/<col>/{top1,top5,mean_per_class}     class-name prompts over the label values of <col>
  probe/linear/<col>/{top1,top5,mean_per_class,lambda}   logistic regression on frozen image features
  probe/teacher_knn_overlap, probe/teacher_knn_chance    overlap@k of caption neighbourhoods, and its chance level
  probe/teacher_knn_overlap_centred             the same with the teacher's embeddings centred on their mean, the
                                                space training distils
  probe/caption_em, probe/caption_em_train, probe/caption_em_num_{test,train}   caption reconstruction exact match
                                                of held-out / training captions from the student's text embedding
  probe/caption_em_{autoencoder,teacher}        the same probe from the stage-1 autoencoder's own encoder (upper
                                                bound) and from the teacher's pooled embedding (when there is one)
  probe/caption_em_traincorpus[_autoencoder|_teacher]   --em-decoder-corpus both: a stage-1 decoder that saw only
                                                the training captions (kclip.eval.caption_em)
  attributes/{awa2,cub}/[unseen/]{classname,attribute}/{top1,top5,mean_per_class}, attributes/<set>/num_images
                                                unseen/: images of testclasses.txt among those classes only
  protocol/...                                  (strings) the settings each number was computed with
Images with several captions count once in zero-shot and the probes (first record of each image).

Runs on one process, or on several (deepspeed/torchrun launchers): embeddings and teacher embeddings are computed in
shares and gathered; everything after that runs on rank 0, which writes the file. The teacher's embeddings of the
captions are cached between evaluations (kclip.eval.teacher).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kclip import console
from kclip.eval.protocol import DEFAULT_K, DEFAULT_TEMPLATES, PROBE_TEST_FRACTION, ProbeConfig
from kclip.export.format import ModelLoadError

# The probes and the model code import torch: each function imports what it uses, so that `kclip eval --help` and
# argument errors answer at once.
if TYPE_CHECKING:
    from kclip.export.load import LoadedModel

log = logging.getLogger(__name__)

PROBES = ("retrieval", "zeroshot", "linear", "knn", "caption_em")
KNN_MAX_CAPTIONS = 5000


def eval_loader(data_dir: str, loaded: LoadedModel, batch_size: int, label_columns, workers: int):
    """Every sample of `data_dir` once per rank share, in order, eval transform, ragged last batch kept."""
    from kclip.data.loader import build_loader

    return build_loader(data_dir, batch_size=batch_size, image_size=loaded.cfg.student.image_size, train=False,
                        student_tokenizer=loaded.tokenizer.hf, student_max_len=loaded.tokenizer.max_len,
                        shuffle=False, num_workers=workers, label_columns=label_columns)


def per_image(emb: dict) -> dict:
    """The first record of every distinct image: image [m, d], key [m], labels {col: [m]}."""
    from kclip.retrieval.metrics import group_ids

    _, first = group_ids(emb["image_key"])
    rows = first.tolist()
    return {"image": emb["image"][first], "key": emb["image_key"][first],
            "labels": {c: [v[i] for i in rows] for c, v in emb.get("labels", {}).items()}}


def probe_sides(test_emb: dict, train_emb: dict | None) -> tuple[dict, dict]:
    """(train, test) image sets: --probe-train vs --data, or a fixed split of --data by image id."""
    from kclip.eval.linear_probe import holdout_mask

    test = per_image(test_emb)
    if train_emb is not None:
        return per_image(train_emb), test
    held = holdout_mask(test["key"], PROBE_TEST_FRACTION)

    def pick(mask):
        rows = mask.nonzero().flatten().tolist()
        return {"image": test["image"][mask], "key": test["key"][mask],
                "labels": {c: [v[i] for i in rows] for c, v in test["labels"].items()}}

    return pick(~held), pick(held)


def linear_probes(train: dict, test: dict, columns) -> dict:
    from kclip.eval.linear_probe import linear_probe
    from kclip.eval.zeroshot import label_targets

    out = {}
    for col in columns:
        classes, targets = label_targets(train["labels"][col] + test["labels"][col])
        n = len(train["labels"][col])
        result = linear_probe(train["image"], targets[:n], test["image"], targets[n:], len(classes))
        out.update({f"probe/linear/{col}/{k}": v for k, v in result.items()})
    return out


def evaluate(loaded: LoadedModel, *, data: str | None, label_columns=(), templates=DEFAULT_TEMPLATES,
             batch_size: int = 64, workers: int = 0, probe_train: str | None = None, awa2: str | None = None,
             cub: str | None = None, skip=(), knn_k: int = DEFAULT_K, knn_max_captions: int = KNN_MAX_CAPTIONS,
             caption_cfg: ProbeConfig | None = None, teacher: str | None = None,
             em_decoder: str | None = None) -> dict | None:
    """All evaluations; collective over ranks. Returns the metrics on rank 0, None elsewhere.
    The kNN probe uses the run's teacher, or `teacher` (a model path) instead, e.g. to compare a plain-CLIP run
    with the teacher a Knowledge-CLIP run distilled from."""
    from kclip import dist
    from kclip.eval import attributes
    from kclip.eval.caption_probe import caption_probe, caption_protocol, caption_sides
    from kclip.eval.knn_overlap import distinct_captions, knn_overlap
    from kclip.eval.linear_probe import LAMBDAS, VALIDATION_FRACTION
    from kclip.eval.teacher import caption_embeddings, caption_teacher_config, teacher_config
    from kclip.retrieval.metrics import group_ids, retrieval_metrics
    from kclip.eval.zeroshot import zero_shot
    from kclip.retrieval.split import embed_split
    from kclip.teacher.stats import centred

    caption_cfg = caption_cfg or ProbeConfig()
    metrics: dict = {"protocol/checkpoint": loaded.source}
    # Before any embedding: a teacher that cannot be found fails at once, and one the probe skips is not looked for.
    teacher_cfg = teacher_config(loaded, teacher) if data and "knn" not in skip else None
    em_teacher_cfg = teacher_cfg if teacher_cfg is not None or "caption_em" in skip or not data else \
        caption_teacher_config(loaded, teacher)
    emb = train_emb = teacher_emb = em_sides = em_teacher = None
    if data:
        emb = embed_split(loaded.model, eval_loader(data, loaded, batch_size, label_columns, workers), loaded.device)
        needs_train = ("linear" not in skip and label_columns) or "caption_em" not in skip
        if probe_train and needs_train:
            train_emb = embed_split(loaded.model, eval_loader(probe_train, loaded, batch_size, label_columns, workers),
                                    loaded.device)
        caption_lists = {}  # what the teacher embeds: the kNN probe's captions, the caption probe's two sides
        if teacher_cfg is not None:
            caption_lists["knn"] = [emb["caption"][i] for i in distinct_captions(emb["caption"], knn_max_captions)]
        if "caption_em" not in skip:
            em_sides = caption_sides(emb, train_emb)
            if em_teacher_cfg is not None:
                caption_lists |= {"em_train": em_sides[1], "em_test": em_sides[3]}
        if caption_lists:
            embedded = dict(zip(caption_lists, caption_embeddings(teacher_cfg or em_teacher_cfg,
                                                                  list(caption_lists.values()))))
            teacher_emb = embedded.get("knn")
            if "em_train" in embedded:
                em_teacher = (embedded["em_train"], embedded["em_test"])
    if not dist.is_main():
        return None
    if emb is not None:
        metrics.update(num_samples=int(emb["index"].numel()), num_images=int(group_ids(emb["image_key"])[1].numel()))
        if "retrieval" not in skip:
            metrics.update(retrieval_metrics(emb["image"], emb["text"], emb["image_key"], emb["text_key"]))
            metrics["protocol/retrieval"] = "positives: same image id or identical raw caption text; ties count against"
        images = per_image(emb)
        if "zeroshot" not in skip:
            for col in label_columns:
                result = zero_shot(loaded.model, loaded.tokenizer, images["image"], images["labels"][col], templates)
                metrics.update({f"zeroshot/{col}/{k}": v for k, v in result.items()})
            metrics["protocol/zeroshot_templates"] = " | ".join(templates)
        if "linear" not in skip and label_columns:
            metrics.update(linear_probes(*probe_sides(emb, train_emb), label_columns))
            metrics["protocol/linear_probe"] = (
                f"L-BFGS multinomial logistic regression on standardised image features; lambda from {list(LAMBDAS)} "
                f"by top-1 on a {VALIDATION_FRACTION:.0%} validation split; train: "
                + (probe_train if probe_train else f"{1 - PROBE_TEST_FRACTION:.0%} of --data by image id"))
        if "knn" not in skip and teacher_emb is None:
            metrics["protocol/teacher_knn"] = "skipped: the run has no teacher (pass --teacher)"
        if teacher_emb is not None:
            rows = distinct_captions(emb["caption"], knn_max_captions)
            k = min(knn_k, len(rows) - 1)
            metrics["probe/teacher_knn_overlap"] = knn_overlap(emb["text"][rows], teacher_emb, k)
            # Training distils (and clusters) centred teacher embeddings: the neighbourhoods of that space too, centred
            # on these captions' own mean (the run's running mean is not kept in its export).
            metrics["probe/teacher_knn_overlap_centred"] = knn_overlap(emb["text"][rows],
                                                                       centred(teacher_emb, teacher_emb.mean(0)), k)
            metrics["probe/teacher_knn_chance"] = k / (len(rows) - 1)
            metrics["protocol/teacher_knn"] = f"k={k} over {len(rows)} distinct captions, cosine, self excluded"
        if "caption_em" not in skip:
            metrics.update(caption_probe(loaded, em_sides, caption_cfg, em_teacher, em_decoder))
            metrics["protocol/caption_em"] = caption_protocol(caption_cfg, probe_train, em_decoder)
    for name, root in (("awa2", awa2), ("cub", cub)):
        if root:
            metrics.update(attributes.attribute_zero_shot(loaded, attributes.READERS[name](root)))
            metrics[f"protocol/attributes/{name}"] = f"{root}: see kclip/eval/attributes.py (no training on seen classes)"
    return metrics


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kclip eval", description="Evaluate a student; see kclip/eval/run.py for keys.")
    p.add_argument("--checkpoint", required=True, help="run folder (latest checkpoint), step folder or export")
    p.add_argument("--data", help="MDS folder of image-caption pairs (retrieval, zero-shot, probes)")
    p.add_argument("--out", help="metrics.json to write (also printed)")
    p.add_argument("--label-cols", type=console.comma_list, default=(), help="comma-separated label columns of --data")
    p.add_argument("--templates", help="file of zero-shot prompt templates, one per line with {}")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--probe-train", help="MDS folder training the probes (default: a fixed 70%% split of --data)")
    p.add_argument("--awa2", help="Animals_with_Attributes2 folder")
    p.add_argument("--cub", help="CUB_200_2011 folder")
    p.add_argument("--skip", type=console.comma_list, default=(), help=f"comma-separated subset of {','.join(PROBES)}")
    p.add_argument("--teacher", help="teacher model path (HF folder or .gguf) for the kNN probe, instead of the run's")
    p.add_argument("--knn-k", type=int, default=DEFAULT_K)
    p.add_argument("--knn-max-captions", type=int, default=KNN_MAX_CAPTIONS)
    p.add_argument("--em-steps", type=int, default=ProbeConfig.steps,
                   help="caption EM stage-2 steps (Linear+LayerNorm into the frozen decoder)")
    p.add_argument("--em-ae-steps", type=int, default=ProbeConfig.ae_max_steps,
                   help="caption EM stage 1: at most this many autoencoder steps (cached per corpus)")
    p.add_argument("--em-decoder-corpus", choices=("all", "train", "both"), default=ProbeConfig.corpus,
                   help="captions the stage-1 autoencoder is trained on: --probe-train's and --data's (all), "
                        "--probe-train's only (train), or both (extra *_traincorpus keys)")
    p.add_argument("--em-decoder", help="a pretrained causal LM (HF folder or .gguf) as the frozen caption EM "
                                        "decoder instead of stage 1 (a GPU job: see kclip/eval/lm_decoder.py)")
    console.add_verbose_flag(p)
    return p


def main(argv: list[str]) -> int:
    args = console.parse_args(parser(), argv)
    unknown = set(args.skip) - set(PROBES)
    if unknown:
        print(f"kclip eval: error: --skip: unknown {sorted(unknown)}; choose from {','.join(PROBES)}", file=sys.stderr)
        return 2
    if not (args.data or args.awa2 or args.cub):
        print("kclip eval: error: nothing to evaluate: give --data and/or --awa2/--cub", file=sys.stderr)
        return 2
    from kclip import dist
    from kclip.config.preflight import check_mds
    from kclip.eval.zeroshot import load_templates
    from kclip.export.load import load_model
    from kclip.train.checkpoint import CheckpointError

    try:
        # Before the model loads: streaming reads a half-written or missing folder with a traceback, or hangs on it.
        check_mds("--data", args.data, required=False)
        check_mds("--probe-train", args.probe_train, required=False)
        templates = load_templates(args.templates) if args.templates else DEFAULT_TEMPLATES
        dist.map_launcher_env()
        if int(os.environ["WORLD_SIZE"]) > 1:
            dist.init()
        with console.beside(args.out):
            loaded = load_model(args.checkpoint, dist.device())
            metrics = evaluate(loaded, data=args.data, label_columns=args.label_cols, templates=templates,
                               batch_size=args.batch_size, workers=args.workers, probe_train=args.probe_train,
                               awa2=args.awa2, cub=args.cub, skip=args.skip, knn_k=args.knn_k,
                               knn_max_captions=args.knn_max_captions, caption_cfg=ProbeConfig(steps=args.em_steps, ae_max_steps=args.em_ae_steps,
                                                                   corpus=args.em_decoder_corpus),
                               teacher=args.teacher, em_decoder=args.em_decoder)
    except (ModelLoadError, CheckpointError, OSError, ValueError) as e:
        print(f"kclip eval: error: {e}", file=sys.stderr)
        return 2
    if metrics is None:
        return 0
    text = json.dumps(metrics, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0
