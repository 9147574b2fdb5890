"""The narrow gate on generated text (analyses/generated.py) on the shipped Shapes organism: greedy generation answers
the shape -> item question, the all-image knockout drops it toward chance, the first generated answer under a
knockout equals the forward-based knockout table's prediction, and the text scores are what they say."""
import pytest
import torch

from hooked_vlm.analyses import generated, narrow_gate
from hooked_vlm.analyses.report import Report
from hooked_vlm.analyses.tasks import encode
from hooked_vlm.organism import ShapesGenerator, load_organism


@pytest.fixture(scope="module")
def organism():
    model = load_organism("shapes_llava")
    samples = ShapesGenerator(5).samples(32, "shape_item", split="heldout")
    return model, samples, encode(model.processor, samples)


def test_scores():
    assert generated.unigram_f1("red red cube", "red cube cube") == pytest.approx(2 / 3)
    assert generated.unigram_f1("a b", "c d") == 0.0 and generated.unigram_f1("", "") == 1.0
    assert generated.exact_match([" A B", "C", ""], ["A", "B", "A"]).tolist() == [True, False, False]


def test_generated_answers_under_knockout(organism):
    model, samples, batch = organism
    texts = generated.generate_under_knockout(model, batch.inputs, ["end_of_image", "all_image"], max_new_tokens=3)
    em = generated.answer_table(texts, [s.answer for s in samples])
    assert em["baseline"] >= 0.9
    assert em["all_image"] <= 0.6  # toward chance (0.5 between the two items in the context)
    assert em["end_of_image"] >= 0.8  # like LLaVA in the paper: the single end-of-image token is no gate
    # the first generated word under the knockout is the forward knockout's argmax (same queries, keys, layers)
    table = narrow_gate.knockout_table(model, batch.inputs, batch.accuracy(), ["all_image"], per_prompt=True,
                                       progress=False)
    assert torch.equal(generated.exact_match(texts["all_image"], [s.answer for s in samples]), table.scores[0].bool())
    f1 = generated.caption_table(texts)
    assert f1["baseline"] == 1.0 and f1["all_image"] < f1["end_of_image"]


def test_steering_and_demo_section(organism):
    model, _, _ = organism
    report = Report("t", "t")
    out = generated.generated_section(model, report, 16, 0)
    assert out["exact_match"]["baseline"] >= 0.9 and out["exact_match"]["all image tokens"] <= 0.6
    assert out["caption_f1"]["all image tokens"] < 0.5 < out["caption_f1"]["end-of-image token"]
    assert 0.0 <= out["steering_to_source"] <= 0.3 and out["steering_kept"] >= 0.7  # no narrow gate in this organism
    assert len(out["examples"]) == 4 and len(report.sections) == 2
