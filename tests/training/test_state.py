import json

import pytest
import torch

from voxgen.data.batches import epoch_batches
from voxgen.training.state import lr_at, optimizer_from_checkpoint, optimizer_to_checkpoint


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, 1.0, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_at(60, 1.0, 10, 110, 0.1) == pytest.approx(0.55)
    assert lr_at(110, 1.0, 10, 110, 0.1) == pytest.approx(0.1)


def test_epoch_batches_are_full_permutations_and_reproducible():
    batches = epoch_batches(10, 3, seed=1, epoch=0)
    assert len(batches) == 3 and all(len(b) == 3 for b in batches)
    assert len(set(sum(batches, []))) == 9
    assert batches == epoch_batches(10, 3, seed=1, epoch=0)
    assert batches != epoch_batches(10, 3, seed=1, epoch=1)
    assert epoch_batches(2, 4, seed=0, epoch=0)[0].count(0) == 2


def test_optimizer_state_round_trip():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, groups = optimizer_to_checkpoint(opt)
    # What a checkpoint stores: copies of the tensors and the groups as JSON.
    tensors = {k: v.clone() for k, v in tensors.items()}
    groups = json.loads(json.dumps(groups))
    clone = torch.nn.Linear(3, 2)
    clone.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(clone.parameters(), lr=0.5)
    optimizer_from_checkpoint(opt2, tensors, groups)
    for m, o in ((model, opt), (clone, opt2)):
        o.zero_grad()
        m(torch.ones(1, 3)).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
