"""Colour scales do not stretch float noise: a comparison whose values differ by rounding only is
drawn in one flat colour and labelled "no change", on the HTML page and in the PNG heatmaps."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from toolkit.analysis.compare import compare
from toolkit.attention import WEIGHT_ROLES
from toolkit.cli import main
from toolkit.render.compare_plots import _change_heatmaps
from toolkit.render.scales import NOISE_FLOOR, within_noise

VIEW_DOM = Path(__file__).with_name("view_dom.js")
QUERY = "encoder.layer.0.attention.self.query.weight"


def _changed_copy(model: Path, folder: Path, change) -> Path:
    """A copy of `model` whose every 2-D weight (float32) is replaced by change(weight)."""
    shutil.copytree(model, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    save_file(
        {name: change(name, t) if t.ndim == 2 else t for name, t in tensors.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return folder


def _one_ulp_up(name: str, weight: np.ndarray) -> np.ndarray:
    """Each element moved to the next float32 away from zero: a change of pure rounding size."""
    return np.nextafter(weight, np.copysign(np.inf, weight)).astype(np.float32)


def _query_of_layer_0_times(factor: float):
    def change(name: str, weight: np.ndarray) -> np.ndarray:
        return (weight * np.float32(factor)).astype(np.float32) if name == QUERY else weight

    return change


@pytest.fixture(scope="module")
def rounding_only(tiny_bert, tmp_path_factory) -> Path:
    return _changed_copy(tiny_bert, tmp_path_factory.mktemp("ulp") / "model", _one_ulp_up)


@pytest.fixture(scope="module")
def query_scaled(tiny_bert, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scaled") / "model"
    return _changed_copy(tiny_bert, folder, _query_of_layer_0_times(1.1))


def test_the_noise_floor_is_relative_to_the_larger_of_one_and_the_values():
    assert within_noise(0.0, 1.2e-7) and within_noise(1 - 1e-16, 1.0)
    assert not within_noise(0.0, 1e-5) and not within_noise(0.999, 1.0)
    assert within_noise(1000.0, 1000.0 + 1e-4)  # 1e-7 of the values' size
    assert not within_noise(1000.0, 1000.0 + 1e-2)


def _drawn(tmp_path: Path, model_a: Path, model_b: Path) -> dict:
    """What the page of `compare A B --html` draws: cell fills per map, legend texts."""
    if shutil.which("node") is None:
        pytest.skip("node is needed to run the page's script without a browser")
    page = tmp_path / "page.html"
    result = CliRunner().invoke(main, ["compare", str(model_a), str(model_b), "--html", str(page)])
    assert result.exit_code == 0, result.output
    out = subprocess.run(
        ["node", str(VIEW_DOM), str(page)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_page_of_rounding_only_changes_is_flat_and_says_no_change(
    tiny_bert, rounding_only, tmp_path
):
    # the premise: relative changes of rounding size, not exactly 0 (else any scale is flat)
    comparison = compare(tiny_bert, rounding_only)
    changes = [h.relative_change for layer in comparison.layers for h in layer.matrices["wq"].heads]
    assert 0 < max(changes) < NOISE_FLOOR
    drawn = _drawn(tmp_path, tiny_bert, rounding_only)
    for name in [*(f"compare-{r}" for r in WEIGHT_ROLES), "compare-all", "circuit-qk"]:
        assert len(set(drawn["maps"][name])) == 1, name  # one flat colour
    cosine_fills = {fill for r in WEIGHT_ROLES for fill in drawn["maps"][f"cosine-{r}"]}
    assert len(cosine_fills) == 1
    assert cosine_fills != set(drawn["maps"]["compare-wq"])  # cosine 1 is the light end
    assert drawn["legends"] == [
        ["relative change", "no change (all 0 ± float noise)"],
        ["cosine", "no change (all 1 ± float noise)"],
        ["relative change", "no change (all 0 ± float noise)"],
    ]


def test_a_real_change_still_spans_the_colour_scale(tiny_bert, query_scaled, tmp_path):
    drawn = _drawn(tmp_path, tiny_bert, query_scaled)
    fills = drawn["maps"]["compare-wq"]  # layer 0's 3 heads, then layer 1's
    assert len(set(fills[:3])) == 1 and len(set(fills[3:])) == 1 and fills[0] != fills[3]
    # Wq x 1.1: ||ΔW|| / ||W|| = 0.1 for every head of layer 0; the scale runs from 0 to it
    assert drawn["legends"][0] == ["relative change", "0", "0.1000"]


def test_png_heatmaps_of_rounding_only_changes_are_flat_and_say_no_change(
    tiny_bert, rounding_only, query_scaled
):
    figure = _change_heatmaps(compare(tiny_bert, rounding_only), WEIGHT_ROLES)
    panels = [axis for axis in figure.axes if axis.get_images()]  # not the colour bars
    assert len(panels) == len(WEIGHT_ROLES)
    for axis in panels:  # flat at the "no change" end of a 0..1 scale
        assert axis.get_images()[0].get_clim() == (0, 1.0)
        assert axis.get_title().endswith("(no change)")
    figure = _change_heatmaps(compare(tiny_bert, query_scaled), WEIGHT_ROLES)
    panel = next(axis for axis in figure.axes if axis.get_images())
    # Wq x 1.1 in float32: the relative change is 0.1 to float32 rounding (1e-6 is ample)
    assert panel.get_images()[0].get_clim() == pytest.approx((0, 0.1), rel=1e-6)
    assert "no change" not in panel.get_title()
