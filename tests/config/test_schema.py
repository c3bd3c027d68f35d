"""The config schema (mlcd_jax/config/schema.py): each section declared once and used by the
trainer, LiT and the head; one check naming the field; older configs upgraded in one place; the
presets by name."""

import json

import ml_collections
import pytest

from mlcd_jax.config import presets, schema
from mlcd_jax.runtime.errors import UserError


def test_every_preset_loads_by_name_and_passes_the_check():
    for name in presets.names():
        module = {}
        exec(compile(presets.path(name).read_text(), str(presets.path(name)), "exec"), module)
        c = module["get_config"]()
        kind = schema.LIT if name.startswith("lit") else schema.TRAINER
        upgraded = schema.upgrade(c, kind)
        assert upgraded.to_dict() == c.to_dict(), name  # a config of this version: unchanged
        if not dict(c.get("heads", {})):  # region heads' K is set by the demo (0 until then)
            schema.check(c, kind)


def test_one_declaration_serves_the_config_the_head_and_lit():
    c = schema.base_config()
    head = schema.head(c)
    assert isinstance(head, schema.Head)
    for f in schema.Head.config_fields():  # the config's defaults are the head's
        assert c.head[f.name] == getattr(schema.Head(), f.name), f.name
    assert head.matmul_dtype == "bfloat16"  # "" is the model's compute dtype
    lit = schema.lit_config()
    assert set(lit.optim) == set(c.optim) and lit.optim.lr == 1e-3 and c.optim.lr == 5e-4
    assert {k for k in lit if not isinstance(lit[k], ml_collections.ConfigDict)} \
        == {k for k in c if not isinstance(c[k], ml_collections.ConfigDict)}  # Run's fields
    region = schema.RegionHead.section()
    assert set(region) - set(c.head) == {"labels", "regions", "num_labels", "missing_labels"}
    assert region.loss == "unicom" and schema.RegionHead.skip_unlabelled


@pytest.mark.parametrize("where, value, says", [
    ("head.loss", "arcface", "config.head.loss: must be one of ('mlcd', 'unicom'"),
    ("head.sample_ratio", 1.5, "config.head.sample_ratio: must be in (0, 1], got 1.5"),
    ("data.workers", -2, "config.data.workers: must be ≥ -1 (-1 = automatic, 0 = none)"),
    ("optim.lr", 0.0, "config.optim.lr: must be > 0, got 0.0"),
    ("evals.probes", ("knn", "svm"), "config.evals.probes: must be a non-empty subset"),
    ("keep_checkpoints", 0, "config.keep_checkpoints: must be ≥ 1, got 0"),
])
def test_the_check_names_the_field(where, value, says):
    c = schema.base_config()
    section, _, field = where.rpartition(".")
    (c[section] if section else c)[field] = value
    with pytest.raises(UserError, match=f"^{said(says)}"):
        schema.check(c)


def said(text: str) -> str:
    return "".join("\\" + ch if ch in "()[]{}.*+?^$|\\" else ch for ch in text)


def test_a_region_heads_fields_are_checked_by_name():
    c = schema.base_config()
    c.heads.ocr = schema.region_head(num_classes=10, regions="txt")
    with pytest.raises(UserError, match=r"^config\.heads\.ocr\.regions: must be one of"):
        schema.check(c)
    with pytest.raises(UserError, match="RegionHead: no field 'region'"):
        schema.region_head(region="text")


def test_an_old_workdir_config_is_upgraded_in_one_place(tmp_path):
    """A config.json from before fields existed (and with a renamed field) reads as this
    version's: the new fields at their defaults, the old name under the new one."""
    old = schema.base_config().to_dict()
    for section, fields in (("data", ("resolution", "max_tokens", "min_tokens")),
                            ("head", ("negatives", "negative_filter")),
                            ("model", ("rope_theta", "region_layers"))):
        for f in fields:
            del old[section][f]
    old["evals"]["dataset"] = old["evals"].pop("source") or "digits"
    (tmp_path / "config.json").write_text(json.dumps(old))
    c = schema.upgrade(ml_collections.ConfigDict(json.loads((tmp_path / "config.json")
                                                            .read_text())))
    assert c.data.resolution == "square" and c.head.negative_filter == 1.0
    assert c.model.rope_theta == 10000.0 and c.evals.source == "digits"
    assert "dataset" not in c.evals
    schema.check(c)
    fresh = schema.base_config()
    fresh.evals.source = "digits"
    assert c.to_dict() == fresh.to_dict()
