"""Every shipped organism (one per family): its record, accuracy through HookedVLM, parity with HF, its planted
heads; and the family recipes (token sequences equal the processor's, training resumes bit-identically)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hooked_vlm.organism import CHECKPOINTS, ShapesGenerator, load_organism, load_organism_hf, organism_record
from hooked_vlm.organism import shipped_organisms
from hooked_vlm.organism.processing import qwen_pixel_values
from hooked_vlm.organism.recipes import RECIPES, get_recipe
from hooked_vlm.organism.state import saved_model
from hooked_vlm.organism.train import TrainConfig, build_sequence, planted_targets, train_organism

SHIPPED = shipped_organisms("circuit")  # effect organisms are tested in test_effect_organisms.py


def test_shipped_organisms_cover_two_families_and_both_layouts_within_20_mb():
    records = [organism_record(n) for n in SHIPPED]
    assert {"llava", "qwen2_vl"} <= {r.get("family", "llava") for r in records}
    assert {"fixed", "random"} <= {r["task"]["layout"] for r in records}
    size = sum(f.stat().st_size for f in CHECKPOINTS.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, f"shipped organisms take {size / 2**20:.1f} MB"


@pytest.mark.parametrize("family", sorted(RECIPES))
@pytest.mark.parametrize("query", ["shape_item", "colour_item", "shape_colour", "scene"])
def test_training_sequences_equal_the_processor(family, query):
    """So the planted-head positions computed for training hold on evaluation prompts too."""
    recipe = get_recipe(family)
    proc = recipe.build_processor()
    for s in ShapesGenerator(5).samples(3, query):
        ids = proc(images=[s.image], text=[s.prompt], return_tensors="pt")["input_ids"][0].tolist()
        assert ids == build_sequence(s.scene, [(s.query, s.target)], with_answers=False, family=family).ids


def test_qwen_fast_pixel_path_equals_the_processor():
    images = [s.image for s in ShapesGenerator(6).samples(3, "shape_item")]
    ref = get_recipe("qwen2_vl").build_processor().image_processor(images=images, return_tensors="pt")
    fast = qwen_pixel_values(images)
    assert torch.equal(fast["image_grid_thw"], ref["image_grid_thw"])
    torch.testing.assert_close(fast["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)


def test_qwen_training_resumes_bit_identically(tmp_path):
    def run(state, stops):
        for stop in stops:
            train_organism(tmp_path / "out", steps=4, seed=3, resume=True, state_dir=tmp_path / state,
                           cfg=TrainConfig(family="qwen2_vl", batch_size=4, eval_every=10**6), progress=False,
                           stop_after=stop)
        return saved_model(tmp_path / state)

    straight, resumed = run("a", [4]), run("b", [2, 4])
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


# ------------------------------------------------------------------------------------------- shipped models
@pytest.fixture(scope="module", params=SHIPPED)
def organism(request):
    torch.set_num_threads(1)
    return request.param, load_organism(request.param), organism_record(request.param)


def _inputs(model, samples):
    return dict(model.processor(images=[s.image for s in samples], text=[s.prompt for s in samples],
                                return_tensors="pt", padding=True))


def test_record_describes_the_planted_circuit(organism):
    name, model, record = organism
    assert record["name"] == name and record.get("family", "llava") == model.cfg.family
    roles = {(h["layer"], h["head"]): h["role"] for h in record["planted_circuit"]}
    assert roles == {(0, 0): "gather", (1, 0): "image_lookup", (2, 0): "retrieval"}
    assert record["accuracy"]["heldout_combinations"]["shape_item"] >= 0.95


@pytest.mark.parametrize("query", ["shape_item", "colour_item", "shape_colour"])
def test_heldout_accuracy_through_hooked_vlm_and_parity(organism, query):
    name, model, record = organism
    task = record["task"]
    samples = ShapesGenerator(77, task["layout"], task.get("n_objects", 2)).samples(96, query, split="heldout")
    inputs = _inputs(model, samples)
    with torch.no_grad():
        logits = model(**inputs)
    preds = model.tokenizer.convert_ids_to_tokens(logits[:, -1].argmax(-1).tolist())
    assert np.mean([p == s.answer for p, s in zip(preds, samples)]) >= 0.95
    if query == "shape_item":
        hf, _ = load_organism_hf(name, attn_implementation="eager")
        with torch.no_grad():
            ref = hf(**inputs).logits
        real = inputs["attention_mask"].bool()
        assert (ref - logits)[real].abs().max() < 1e-3 * max(1.0, ref.abs().max().item())


def test_planted_heads_attend_where_they_were_told(organism):
    """Mean attention mass of each planted head on its targets, read from our own cache."""
    name, model, record = organism
    masses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    task = record["task"]
    for s in ShapesGenerator(78, task["layout"], task.get("n_objects", 2)).samples(24, "shape_item", split="heldout"):
        _, cache = model.run_with_cache(**_inputs(model, [s]), names_filter=lambda n: n.endswith("hook_pattern"))
        for layer, rows in planted_targets(s, model.cfg.family).items():
            for q, keys in rows:
                masses[layer].append(float(cache[f"blocks.{layer}.attn.hook_pattern"][0, 0, q, keys].sum()))
    mean = {l: float(np.mean(v)) for l, v in masses.items()}
    assert min(mean.values()) > 0.5, mean
