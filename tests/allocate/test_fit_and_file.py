import json

import pytest

from mrprune.allocate import AllocationContext, build_allocator, fit_to_target, weighted_mean
from mrprune.config import merge, PruneConfig
from mrprune.errors import ConfigError
from mrprune.models import get_adapter
from tests.conftest import tiny_model


def test_fit_hits_weighted_target_and_respects_bounds():
    ratios = [0.2, 0.95, 1.3, -0.4, 0.6]
    sizes = [10, 20, 5, 40, 25]
    fitted = fit_to_target(ratios, sizes, 0.7)
    assert weighted_mean(fitted, sizes) == pytest.approx(0.7, abs=1e-12)
    assert all(0.0 <= r <= 0.99 for r in fitted)
    # order is kept (a clamped shift, not a reshuffle)
    assert all(fitted[i] <= fitted[j] for i in range(5) for j in range(5) if ratios[i] < ratios[j])
    assert fitted[2] == fitted[1] == 0.99 and fitted[3] == min(fitted)


def test_fit_leaves_exact_ratios_unchanged():
    assert fit_to_target([0.4, 0.6], [1, 1], 0.5) == pytest.approx([0.4, 0.6])


def allocate(tmp_path, content, target=None, name="ratios.json"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    model = tiny_model("llama")
    adapter = get_adapter(model)
    config = merge(PruneConfig(), {"allocation.method": "file", "allocation.ratios": str(path)})
    return adapter, build_allocator("file", config).allocate(AllocationContext(adapter, target))


def test_file_block_ratios_used_as_given_without_target(tmp_path):
    adapter, allocation = allocate(tmp_path, [0.3, 0.5, 0.7])
    assert allocation.block_targets == pytest.approx([0.3, 0.5, 0.7])
    assert allocation.target == pytest.approx(0.5)


def test_file_ratios_are_shifted_to_an_explicit_target(tmp_path):
    adapter, allocation = allocate(tmp_path, "blocks: [0.3, 0.5, 0.7]\n", target=0.6, name="r.yaml")
    assert weighted_mean(allocation.block_targets, adapter.block_sizes()) == pytest.approx(0.6, abs=1e-12)


def test_file_layer_ratios(tmp_path):
    adapter = get_adapter(tiny_model("llama"))
    layers = {ref.name: 0.2 if "mlp" in ref.name else 0.6 for ref in adapter.all_linear_layers()}
    _, allocation = allocate(tmp_path, {"layers": layers})
    assert allocation.layer_targets == pytest.approx(layers)


@pytest.mark.parametrize("content,message", [
    ([0.5, 0.5], "has 2 block ratios but the model has 3"),
    ([0.5, 1.2, 0.5], "must be a number in \\[0, 1\\)"),
    ({"layers": {"model.layers.0.nope": 0.5}}, "unknown layer 'model.layers.0.nope'"),
    ({"layers": {"model.layers.0.mlp.up_proj": 0.5}}, "gives no ratio for layer"),
    ({"weird": [0.5]}, "exactly one of the keys"),
    ({"blocks": {0: 0.5}}, "'blocks' must be a list with one ratio per block, in order, got dict"),
    ({"layers": [0.5, 0.5, 0.5]}, "'layers' must map layer names to ratios, got list"),
])
def test_bad_ratios_files(tmp_path, content, message):
    with pytest.raises(ConfigError, match=message):
        allocate(tmp_path, content)
