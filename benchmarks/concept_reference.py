"""Where concept learning's gap comes from, on a finished run: the KL its heads reached, the KL fresh heads reach
alone on its frozen final embeddings (kclip/concepts/reference.py), and the ratio of the concept gradient to the
contrastive one on the shared towers, at the run's initial and final weights (what beta should follow).

    python benchmarks/concept_reference.py --run RUN_DIR [--steps 2000] [--out results/concept_reference.json]

The soft labels are the run's final ones (its last concept fit), over one epoch of its training rows; the teacher
embeddings come from its teacher cache. One rank, the run's own config.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from kclip import dist  # noqa: E402
from kclip.concepts.reference import mean_kl, reference_kl  # noqa: E402
from kclip.config import load_config  # noqa: E402
from kclip.losses import concept_loss, contrastive_loss, distillation_term  # noqa: E402
from kclip.models.knowledge_clip import KnowledgeCLIP  # noqa: E402
from kclip.train import checkpoint  # noqa: E402
from kclip.train.state import setup  # noqa: E402


def epoch_rows(run) -> tuple[list[dict], list[dict]]:
    """One epoch of the run's training batches and their targets (teacher targets, final soft labels)."""
    batches, targets = [], []
    for batch in run.loader:
        batches.append(batch)
        targets.append(run.task.targets([batch]))
    return batches, targets


def plain_copy(run) -> KnowledgeCLIP:
    """The engine's module outside DeepSpeed, whose gradient hooks would act on torch.autograd.grad's backward."""
    model = KnowledgeCLIP(run.cfg, run.tokenizer, run.task.teacher.hidden_size)
    model.load_state_dict(run.engine.module.state_dict())
    return model


def tower_grad_norms(module: KnowledgeCLIP, cfg, batch: dict, targets: dict) -> dict[str, float]:
    """Norm of each term's gradient on the shared towers (`student.*`), the concept term unweighted (beta = 1,
    summed over heads as the loss does), and of the concept term's gradient on the heads themselves."""
    out = module(batch["pixels"], batch["input_ids"], batch["attention_mask"])
    terms = {"contrastive": contrastive_loss(out["image_emb"], out["text_emb"], out["logit_scale"]),
             "concept": sum(concept_loss(logits, targets["soft_labels"]) for logits in out["concept_logits"].values())}
    if cfg.distill_weight > 0:
        student = out["text_emb"] if cfg.distill_kind == "relational" else out["distill_pred"]
        terms["distill"] = distillation_term(cfg.distill_kind, student, targets["teacher_target"], cfg.distill_tau)
    towers = [p for n, p in module.named_parameters() if n.startswith("student.")]
    heads = list(module.concept_heads.parameters())
    norms = {}
    for name, term in terms.items():
        grads = torch.autograd.grad(term, towers, retain_graph=True, allow_unused=True)
        norms[name] = float(torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None)))
    head_grads = torch.autograd.grad(terms["concept"], heads)
    norms["concept_on_heads"] = float(torch.sqrt(sum(g.pow(2).sum() for g in head_grads)))
    norms["concept_per_contrastive"] = norms["concept"] / norms["contrastive"]
    return norms


def grad_ratio(run, batches, targets, n: int) -> dict:
    """Medians over the first `n` batches of `tower_grad_norms`, at the engine's current weights."""
    module = plain_copy(run)
    rows = [tower_grad_norms(module, run.cfg.loss, b, t) for b, t in zip(batches[:n], targets[:n])]
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def embeddings(run, batches, targets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Frozen image and text embeddings and soft labels of all rows, and the KL the run's own heads reach on them."""
    module = run.engine.module
    image, text, labels = [], [], []
    with torch.no_grad():
        for batch, t in zip(batches, targets):
            out = run.task.forward(batch)
            image.append(out["image_emb"].float())
            text.append(out["text_emb"].float())
            labels.append(t["soft_labels"])
    image, text, labels = torch.cat(image), torch.cat(text), torch.cat(labels)
    return image, text, labels, mean_kl(module.concept_heads, image, text, labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished run folder (its config.yaml and final checkpoint)")
    p.add_argument("--steps", type=int, default=2000, help="full-batch Adam steps of the reference heads")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--grad-batches", type=int, default=4, help="batches whose gradient norms are measured")
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args()
    run_dir = Path(args.run)
    cfg = load_config(str(run_dir / "config.yaml"), ["data.shuffle=false", "data.num_workers=0"])
    dist.init(cfg.dist.timeout_s, cfg.dist.rendezvous_timeout_s)
    run = setup(cfg, run_dir, load_universal=False)
    initial = {k: v.detach().clone() for k, v in run.engine.module.state_dict().items()}
    client, _ = checkpoint.load(run.engine, checkpoint.resolve(run_dir, "latest"))
    run.task.bank.load_state_dict(client["concepts"])
    run.task.stats.load_state_dict(client["teacher_stats"])
    batches, targets = epoch_rows(run)
    image, text, labels, trained = embeddings(run, batches, targets)
    final_ratio = grad_ratio(run, batches, targets, args.grad_batches)
    run.engine.module.load_state_dict(initial)
    initial_ratio = grad_ratio(run, batches, targets, args.grad_batches)
    alone = reference_kl(image, text, labels, hidden=cfg.student.concept_hidden, kinds=cfg.student.concept_heads,
                         steps=args.steps, lr=args.lr)
    result = {"machine": machine(), "run": str(run_dir), "rows": len(labels), "k": cfg.concepts.k,
              "tau": cfg.concepts.tau, "label_entropy": float(-(torch.special.xlogy(labels, labels)).sum(1).mean()),
              "uniform_ce": float(torch.log(torch.tensor(float(cfg.concepts.k)))),
              "kl_trained_heads": trained, "kl_heads_alone": alone, "reference_steps": args.steps,
              "grad_norms_initial": initial_ratio, "grad_norms_final": final_ratio}
    text_out = json.dumps(result, indent=2)
    print(text_out)
    if args.out:
        Path(args.out).write_text(text_out + "\n")


if __name__ == "__main__":
    main()
