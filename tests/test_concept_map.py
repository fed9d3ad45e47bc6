"""The concept map draws caption embeddings and centroids in one space, the one the concept bank clusters in."""
import pytest
import torch

from kclip.concepts.bank import ConceptBank
from kclip.eval.concept_map import bank_pca


@pytest.mark.parametrize("spherical", [True, False])
def test_centroids_are_drawn_among_the_captions_of_their_concept(spherical):
    # Three tight clusters on top of one large shared component: anisotropic, as decoder-LM embeddings are, so that
    # centring (which the bank does) moves every row far from where normalising it alone puts it.
    g = torch.Generator().manual_seed(0)
    dim, per = 8, 40
    concept = torch.arange(3).repeat_interleave(per)
    emb = 10 * torch.eye(dim)[0] + torch.eye(dim)[1 + concept] + 0.05 * torch.randn(3 * per, dim, generator=g)
    bank = ConceptBank(3, dim, spherical=spherical, backend="torch")
    bank.fit(emb)
    coords, centre_coords, explained, labels = bank_pca(bank, emb)
    assert torch.equal(labels, bank.assign(emb)) and 0 < explained.sum() <= 1
    for c in range(3):
        members = coords[labels == c]
        spread = (members - members.mean(0)).norm(dim=1).max()
        assert (centre_coords[c] - members.mean(0)).norm() < spread + 0.05
