"""ControlNet sudden convergence (diffusers_ant.diff_tuning.convergence): the tracker reports the right
step on constructed sequences, and extractor specs that cannot be loaded are one-line errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_ant.data.toy import edge_map
from diffusers_ant.diff_tuning import ConvergenceTracker, condition_distance, load_condition_extractor


def square(size=16, low=4, high=12):
    image = np.zeros((size, size), dtype=np.uint8)
    image[low:high, low:high] = 255
    return Image.fromarray(image)


def test_reports_the_first_step_below_the_threshold(tmp_path):
    tracker = ConvergenceTracker(threshold=0.1, every=100, output_dir=str(tmp_path))
    sequence = [(100, 0.5), (200, 0.4), (300, 0.1), (400, 0.09), (500, 0.2), (600, 0.05)]
    logs = [tracker.record(step, d) for step, d in sequence]
    assert tracker.converged_step == 400  # 0.1 is not below 0.1; a later rise does not move it
    assert [r["convergence/converged"] for r in logs] == [0, 0, 0, 1, 1, 1]
    assert [("convergence/sudden_convergence" in r) for r in logs] == [False, False, False, True, False, False]
    assert logs[3]["convergence/converged_step"] == 400 and logs[3]["convergence/distance"] == 0.09
    saved = json.loads((tmp_path / "convergence.json").read_text())
    assert saved["converged_step"] == 400 and saved["threshold"] == 0.1 and saved["extractor"] == "outline"
    assert [e["step"] for e in saved["history"]] == [100, 200, 300, 400, 500, 600]
    assert [tracker.should_check(s) for s in (0, 50, 100, 250, 300)] == [False, False, True, False, True]


def test_resume_restores_the_history_and_redone_steps_replace_it(tmp_path):
    tracker = ConvergenceTracker(threshold=0.1, every=10)
    for step, d in [(10, 0.5), (20, 0.05), (30, 0.3)]:
        tracker.record(step, d)
    state = json.loads(json.dumps(tracker.state_dict()))  # plain JSON
    resumed = ConvergenceTracker(threshold=0.1, every=10, output_dir=str(tmp_path))
    resumed.load_state_dict({"history": state["history"][:1]})  # the checkpoint was taken at step 10
    assert resumed.converged_step is None
    resumed.record(20, 0.2)  # the resumed run measures step 20 again, differently
    resumed.record(20, 0.08)  # and a repeated step replaces, never duplicates
    assert resumed.history == [{"step": 10, "distance": 0.5}, {"step": 20, "distance": 0.08}]
    assert resumed.converged_step == 20
    assert json.loads((tmp_path / "convergence.json").read_text())["converged_step"] == 20


def test_update_re_extracts_outlines_from_images():
    """Noise images are far from the outline condition; the image the outline was made from is at distance 0."""
    target = square()
    condition = edge_map(np.asarray(target))  # the input condition, as mnist5k_captions makes it
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)) for _ in range(2)]
    for distance in ("mse", "mae", "iou"):
        tracker = ConvergenceTracker(threshold=0.01, every=50, distance=distance)
        tracker.update(50, noise, [condition, condition])
        tracker.update(100, [noise[0], target.convert("RGB")], condition)  # half converged: mean distance
        tracker.update(150, [target, target], torch.from_numpy(condition).float().div(255)[None].expand(2, 3, -1, -1))
        distances = [e["distance"] for e in tracker.history]
        assert distances[0] > distances[1] > distances[2] == 0.0, distance
        assert tracker.converged_step == 150


def test_distances():
    a = np.zeros((4, 4), dtype=np.uint8)
    b = a.copy()
    b[0, :] = 255  # 4 of 16 pixels differ
    assert condition_distance(a, b, "mse") == condition_distance(a, b, "mae") == 0.25
    assert condition_distance(b, b, "iou") == 0.0 and condition_distance(a, b, "iou") == 1.0
    assert condition_distance(a, a, "iou") == 0.0  # both empty
    c = b.copy()
    c[1, :2] = 255
    assert condition_distance(b, c, "iou") == pytest.approx(1 - 4 / 6)
    # a condition of another size is resized to the image's
    big = np.kron(b, np.ones((2, 2), dtype=np.uint8))
    assert condition_distance(b, big, "mse") == 0.0
    with pytest.raises(ValueError, match="unknown convergence distance 'l2': choose one of mse, mae, iou"):
        condition_distance(a, b, "l2")


def test_user_extractor_from_module_and_file(tmp_path):
    extractor = load_condition_extractor("numpy:asarray")
    assert extractor is np.asarray
    source = tmp_path / "my_extractor.py"
    source.write_text("import numpy as np\n\ndef inverted(image):\n    return 255 - np.asarray(image.convert('L'))\n")
    extractor = load_condition_extractor(f"{source}:inverted")
    tracker = ConvergenceTracker(threshold=0.5, extractor=f"{source}:inverted")
    image = square()
    assert tracker.measure([image], 255 - np.asarray(image)) == 0.0
    assert extractor(image).max() == 255


@pytest.mark.parametrize("spec, message", [
    ("edges", r"unknown condition extractor 'edges': use one of outline or module:function"),
    ("no_such_module_xyz:extract", r"cannot import 'no_such_module_xyz' \(ModuleNotFoundError: .*\); check the module is on PYTHONPATH"),
    ("numpy:no_such_function", r"'numpy' has no attribute 'no_such_function'"),
    ("numpy:pi", r"'pi' is not a function"),
    ("/no/such/file.py:f", r"file '/no/such/file.py' does not exist"),
    (":f", r"unknown condition extractor ':f'"),
])
def test_bad_extractor_specs_are_one_line(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        ConvergenceTracker(threshold=0.1, extractor=spec)
    assert "\n" not in str(info.value)


def test_broken_module_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "broken_extractor_mod.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"cannot import 'broken_extractor_mod' \(SyntaxError") as info:
        load_condition_extractor("broken_extractor_mod:f")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": 0}, "--convergence_threshold must be a number > 0"),
    ({"threshold": "x"}, "--convergence_threshold must be a number > 0"),
    ({"threshold": 0.1, "every": 0}, "--convergence_steps must be an integer >= 1"),
    ({"threshold": 0.1, "distance": "ssim"}, "unknown convergence distance 'ssim'"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConvergenceTracker(**kwargs)


def test_evaluate_samples_with_a_fixed_seed_then_updates():
    target = square()
    condition = edge_map(np.asarray(target))

    class FakeAdapter:
        calls = []

        def sample(self, pipeline, num_images, generator, **kwargs):
            self.calls.append((num_images, generator.initial_seed(), kwargs["conditioning_images"], kwargs["prompts"]))
            return [target] * num_images

    adapter = FakeAdapter()
    tracker = ConvergenceTracker(threshold=0.01, every=10)
    records = tracker.evaluate(10, adapter, pipeline=None, conditions=[condition, condition], prompts=["a"], seed=7)
    assert records["convergence/distance"] == 0.0 and tracker.converged_step == 10
    assert adapter.calls[0][0] == 2 and adapter.calls[0][1] == 7 and adapter.calls[0][3] == ["a"]
