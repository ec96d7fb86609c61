"""Save on 2 ranks, load on 3, save, load on 1 (spawned) and with no process group."""

import pytest
import torch

import margin_ext as mx
from dist_checks import DIM, NUM_CLASSES, _heads

KINDS = ("sgd", "adamw", "adaface", "curricularface", "subcenter")


def assert_same_state(loaded, saved):
    """Bit for bit: the weight, every optimizer tensor, the groups, the step, the extra state."""
    assert torch.equal(loaded["weight"], saved["weight"])
    assert loaded["optimizer"].keys() == saved["optimizer"].keys()
    for key, value in saved["optimizer"].items():
        assert torch.equal(loaded["optimizer"][key], value), key
        assert loaded["optimizer"][key].dtype == value.dtype, key
    assert loaded["param_groups"] == saved["param_groups"]
    assert loaded["sampling_step"] == saved["sampling_step"] > 0
    assert loaded["margin_state"] == saved["margin_state"]
    assert saved["margin_state"] not in ({"mean": 20.0, "std": 100.0}, {"t": 0.0})  # moved while training
    assert loaded["extra"] == saved["extra"]
    assert loaded["scaler_scale"] == saved["scaler_scale"]


@pytest.mark.parametrize("kind", KINDS)
def test_saved_on_2_loads_on_3(group_of_2, group_of_3, kind):
    assert_same_state(group_of_3["checkpoint"]["loaded"][kind], group_of_2["checkpoint"]["saved"][kind])


@pytest.mark.parametrize("kind", KINDS)
def test_saved_on_3_loads_on_1(group_of_3, group_of_1, kind):
    assert_same_state(group_of_1["checkpoint"]["loaded"][kind], group_of_3["checkpoint"]["saved"][kind])


def _single_process_state(head, optimizer, extra, scaler):
    state = {"weight": head.weight.detach().clone(), "sampling_step": head.sampling_step,
             "margin_state": None if head.margin_state is None else head.margin_state.state_dict(),
             "optimizer": {k: v.clone() for k, v in sorted(optimizer.state[head.weight].items())},
             "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]}
    return dict(state, extra=extra, scaler_scale=scaler.get_scale())


@pytest.mark.parametrize("kind", KINDS)
def test_saved_on_3_loads_without_a_process_group(group_of_3, checkpoint_root, tmp_path, kind):
    head, optimizer = _heads()[kind]
    extra = mx.load_head(str(checkpoint_root / "saved_on_3" / kind), head, optimizer)
    scaler = torch.amp.GradScaler("cpu")
    scaler.load_state_dict(extra["scaler"])
    loaded = _single_process_state(head, optimizer, extra, scaler)
    assert_same_state(loaded, group_of_3["checkpoint"]["saved"][kind])

    # and round trip in a single process
    mx.save_head(str(tmp_path / kind), head, optimizer, extra=extra)
    again, again_optimizer = _heads()[kind]
    again_extra = mx.load_head(str(tmp_path / kind), again, again_optimizer)
    assert_same_state(_single_process_state(again, again_optimizer, again_extra, scaler), loaded)


def test_load_refuses_a_different_head_or_optimizer(group_of_2, checkpoint_root):
    directory = str(checkpoint_root / "saved_on_2" / "sgd")
    with pytest.raises(ValueError, match="num_classes=37"):
        mx.load_head(directory, mx.PartialFC(DIM, NUM_CLASSES + 1))
    with pytest.raises(ValueError, match="embedding_size=12"):
        mx.load_head(directory, mx.PartialFC(DIM + 1, NUM_CLASSES))
    head = mx.PartialFC(DIM, NUM_CLASSES)
    with pytest.raises(ValueError, match="SGD"):
        mx.load_head(directory, head, torch.optim.AdamW(head.parameters()))
    with pytest.raises(ValueError, match="only head.parameters"):
        mx.load_head(directory, head, torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1))
    before = head.weight.detach().clone()
    assert mx.load_head(directory, head)["trainer_step"] == 14  # the weight alone, no optimizer
    assert not torch.equal(head.weight.detach(), before)
