"""Strict loading: a checkpoint that does not match its config is an error naming the tensors, never a partly random
model (HF's loader would initialise missing tensors randomly and only print a table). The checkpoints are edited
with safetensors (no pickle) after `save_pretrained`."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import llava_inputs, qwen_inputs, tiny_llava, tiny_qwen_vl

from hooked_vlm import HookedVLM
from hooked_vlm.organism import ORGANISM_DIR, load_organism, shipped_organisms

Q_PROJ_1 = "model.language_model.layers.1.self_attn.q_proj.weight"


def weights_file(d: Path) -> Path:
    (f,) = sorted(d.glob("*.safetensors"))
    return f


def edit_weights(d: Path, edit) -> None:
    f = weights_file(d)
    sd = load_file(f)
    edit(sd)
    save_file(sd, f, metadata={"format": "pt"})


def edit_config(d: Path, edit) -> None:
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory):
    """A tiny LLaVA saved once; each test copies it and edits the copy. Returns (dir, reference logits, inputs)."""
    d = tmp_path_factory.mktemp("llava")
    hf = tiny_llava()
    hf.save_pretrained(d)
    inputs = llava_inputs(hf, batch=1)
    with torch.no_grad():
        ref = hf(**inputs).logits
    return d, ref, inputs


@pytest.fixture
def llava_dir(saved_llava, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(saved_llava[0], d)
    return d


def load(d: Path, **kw) -> HookedVLM:
    return HookedVLM.from_pretrained(str(d), processor=None, **kw)


def test_clean_checkpoint_loads_and_matches(saved_llava):
    d, ref, inputs = saved_llava
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load(d)
    assert not [w for w in caught if "tensor" in str(w.message)]  # nothing ignored on a clean checkpoint
    with torch.no_grad():
        assert (model(**inputs) - ref).abs().max() <= 1e-4


def test_missing_tensor_is_named(llava_dir):
    edit_weights(llava_dir, lambda sd: sd.pop([k for k in sd if k.endswith("layers.1.self_attn.q_proj.weight")][0]))
    with pytest.raises(ValueError, match=r"missing from the checkpoint: " + Q_PROJ_1.replace(".", r"\.")):
        load(llava_dir)
    with pytest.raises(ValueError, match="missing"):  # strict=False forgives unused tensors only
        load(llava_dir, strict=False)


def test_missing_vision_tower_is_named(llava_dir):
    edit_weights(llava_dir, lambda sd: [sd.pop(k) for k in [k for k in sd if "vision_tower" in k]])
    with pytest.raises(ValueError, match=r"missing from the checkpoint: model\.vision_tower\.") as err:
        load(llava_dir)
    assert "and" in str(err.value) and "more" in str(err.value)  # many tensors, listed with a count


def test_shape_mismatch_is_named(llava_dir):
    def shrink(sd):
        key = [k for k in sd if k.endswith("layers.0.mlp.up_proj.weight")][0]
        sd[key] = sd[key][:10].clone()

    edit_weights(llava_dir, shrink)
    with pytest.raises(ValueError, match=r"another shape .*model\.language_model\.layers\.0\.mlp\.up_proj\.weight "
                                         r"\(checkpoint \(10, 48\), config \(96, 48\)\)"):
        load(llava_dir)


def test_config_with_more_layers_than_the_weights(llava_dir):
    edit_config(llava_dir, lambda c: c["text_config"].update(num_hidden_layers=4))
    with pytest.raises(ValueError, match=r"missing from the checkpoint: .*model\.language_model\.layers\.3\."):
        load(llava_dir)


def test_config_with_fewer_layers_than_the_weights(llava_dir, saved_llava):
    edit_config(llava_dir, lambda c: c["text_config"].update(num_hidden_layers=2))
    with pytest.raises(ValueError, match=r"not used by the model.*model\.language_model\.layers\.2\..*strict=False"):
        load(llava_dir)
    with pytest.warns(UserWarning, match=r"ignored \d+ tensor\(s\).*layers\.2\."):
        model = load(llava_dir, strict=False)
    assert model.cfg.n_layers == 2  # what the user asked for, knowingly


def test_fewer_vision_layers_than_the_weights(llava_dir):
    edit_config(llava_dir, lambda c: c["vision_config"].update(num_hidden_layers=2))
    with pytest.raises(ValueError, match=r"not used by the model.*vision_tower\.encoder\.layers\.2\."):
        load(llava_dir)


def test_extra_tensor_refused_unless_not_strict(llava_dir, saved_llava):
    _, ref, inputs = saved_llava
    edit_weights(llava_dir, lambda sd: sd.update({"model.extra_adapter.weight": torch.zeros(3, 3)}))
    with pytest.raises(ValueError, match=r"model\.extra_adapter\.weight \(pass strict=False"):
        load(llava_dir)
    with pytest.warns(UserWarning, match=r"model\.extra_adapter\.weight"):
        model = load(llava_dir, strict=False)
    with torch.no_grad():
        assert (model(**inputs) - ref).abs().max() <= 1e-4  # the extra tensor changed nothing


def test_tied_embeddings_are_not_reported_missing(tmp_path):
    """A tied checkpoint stores the embedding once (no lm_head.weight): that is complete, not missing."""
    hf = tiny_qwen_vl()
    hf.config.tie_word_embeddings = hf.config.text_config.tie_word_embeddings = True
    hf.tie_weights()
    hf.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(weights_file(tmp_path))
    inputs = qwen_inputs([[(16, 24)]])
    with torch.no_grad():
        ref = hf(**inputs).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = load(tmp_path)
        assert not [w for w in caught if "tensor" in str(w.message)]
        assert model.cfg.tie_word_embeddings
        assert (model(**inputs) - ref).abs().max() <= 1e-4


def test_qwen_vision_depth_disagreeing_with_weights(tmp_path):
    tiny_qwen_vl().save_pretrained(tmp_path)
    edit_config(tmp_path, lambda c: c["vision_config"].update(depth=3))
    with pytest.raises(ValueError, match=r"missing from the checkpoint: .*model\.visual\.blocks\.2\."):
        load(tmp_path)


@pytest.mark.parametrize("name", shipped_organisms())
def test_shipped_organisms_load_strictly(name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert isinstance(load_organism(name), HookedVLM)
    assert not [w for w in caught if "tensor" in str(w.message)]


def test_load_organism_is_strict(tmp_path):
    d = tmp_path / "organism"
    shutil.copytree(ORGANISM_DIR, d)
    edit_weights(d, lambda sd: sd.update({"stray.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"stray\.weight"):
        load_organism(d)
    with pytest.warns(UserWarning, match=r"stray\.weight"):
        load_organism(d, strict=False)
