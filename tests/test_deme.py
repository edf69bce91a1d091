import pytest
import torch

from diffusers_ant import merge_task_vectors


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g).half(),
            "steps": torch.tensor(7)}


def test_task_arithmetic_against_its_formula():
    base, a, b = _state(0), _state(1), _state(2)
    a["steps"] = b["steps"] = base["steps"].clone()
    merged = merge_task_vectors(base, [a, b], [0.25, 0.5])
    expected = base["w"] + 0.25 * (a["w"] - base["w"]) + 0.5 * (b["w"] - base["w"])
    assert torch.allclose(merged["w"], expected, atol=1e-6)
    assert merged["b"].dtype == torch.float16
    assert torch.equal(merged["steps"], base["steps"])
    # weights 1 on one model and 0 elsewhere give that model back; all 0 give the base
    assert torch.allclose(merge_task_vectors(base, [a, b], [1.0, 0.0])["w"], a["w"], atol=1e-6)
    assert torch.equal(merge_task_vectors(base, [a, b], [0.0, 0.0])["w"], base["w"])


def test_merge_refuses_what_cannot_be_merged():
    base, a = _state(0), _state(1)
    with pytest.raises(ValueError, match="one weight per model"):
        merge_task_vectors(base, [a], [0.5, 0.5])
    with pytest.raises(ValueError, match="at least one"):
        merge_task_vectors(base, [], [])
    with pytest.raises(ValueError, match="does not match the base"):
        merge_task_vectors(base, [{"w": a["w"]}], [1.0])
    with pytest.raises(ValueError, match="shape"):
        merge_task_vectors(base, [dict(a, w=torch.zeros(4, 3))], [1.0])
    with pytest.raises(ValueError, match="non-float"):
        merge_task_vectors(base, [dict(a, steps=torch.tensor(8))], [1.0])
